"""A local dashboard of one or more training runs: curves in report.png, best metrics and settings in report.md.

    python -m afqmc_dist.report outputs/afqmc                        # -> outputs/afqmc/report.{md,png}
    python -m afqmc_dist.report outputs/lr1e-5 outputs/lr2e-5 --output_dir outputs/compare
    python -m afqmc_dist.report outputs/sweep        # a sweep folder -> sweep.md, sweep.png, best_config.yaml

A sweep folder (one with sweep.json, written by `python -m afqmc_dist.sweep`) is reported by sweep/report.py.

Each OUTPUT_DIR is a training run's folder: metrics.jsonl and results.json (run_config.json and test_results.json
when present). report.png plots training loss, learning rate, dev accuracy and dev F1 over optimizer steps, one
colour per run, named by --run_name when the run had one, else by its folder. report.md holds each run's best
metrics, the settings that differ between the runs (a single run: its main settings), the confusion matrix of
each run's best evaluation and a link to report.png. Every input is read and checked before anything is written;
both files are written atomically. matplotlib is needed for report.png only: without it report.md is still
written. Errors are one `error: ...` line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from .errors import CommandParser, UserError
from .files import atomic_open, save_png
from .outputs import METRICS, RESULTS, RUN_CONFIG, TEST_RESULTS
from .preemption import run_command

REPORT_MD, REPORT_PNG = "report.md", "report.png"
SWEEP_MARKER = "sweep.json"  # sweep/study.py's SWEEP_JSON
PANELS = (("train/loss", "training loss"), ("train/learning_rate", "learning rate"),
          ("dev/accuracy", "dev accuracy"), ("dev/f1", "dev F1"))
# Left out of the settings comparison: they differ between any two runs without saying anything about them.
PER_RUN_KEYS = {"output_dir", "run_name", "resume_from_checkpoint", "overwrite_output_dir"}
KEY_SETTINGS = ("model_checkpoint", "learning_rate", "num_train_epochs", "batch_size", "gradient_accumulation_steps",
                "global_batch_size", "num_processes", "mixed_precision", "warmup_proportion", "weight_decay",
                "max_seq_length", "seed", "num_parameters", "git_commit")


@dataclass
class Run:
    folder: str
    name: str
    records: list[dict]  # metrics.jsonl, in file order
    results: dict
    config: dict  # {} when the run has no run_config.json
    test: dict  # {} without --do_test


def read_json(path: str) -> dict:
    """The JSON object in `path`; UserError naming the file (and line) if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: a JSON object was expected, found {type(obj).__name__}")
    return obj


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl: JSON objects with an integer "step", numeric curves, square confusion
    matrices. Blank lines are skipped; anything else wrong is a UserError naming the file and line."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:  # bytes that are not UTF-8 fail as bad JSON, by line
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            where = f"{path}:{number}"
            if not isinstance(record, dict):
                raise UserError(f"{where}: a JSON object was expected, found {type(record).__name__}")
            if type(record.get("step")) is not int:
                raise UserError(f"{where}: \"step\" must be an integer, found {record.get('step')!r}")
            for key, _ in PANELS:
                if key in record and not isinstance(record[key], (int, float)):
                    raise UserError(f"{where}: \"{key}\" must be a number, found {record[key]!r}")
            matrix = record.get("dev/confusion_matrix", [])
            if not (isinstance(matrix, list) and all(isinstance(row, list) and len(row) == len(matrix)
                                                     and all(type(n) is int for n in row) for row in matrix)):
                raise UserError(f"{where}: \"dev/confusion_matrix\" must be a square list of rows of counts")
            records.append(record)
    return records


def load_run(folder: str) -> Run:
    """Read and check one run's folder."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such folder")
    for required in (METRICS, RESULTS):
        if not os.path.isfile(os.path.join(folder, required)):
            raise UserError(f"{folder}: no {required} (is it a training output folder?)")
    results = read_json(os.path.join(folder, RESULTS))
    if type(results.get("best_step")) is not int:
        raise UserError(f"{os.path.join(folder, RESULTS)}: no integer \"best_step\"")
    optional = {name: read_json(os.path.join(folder, name)) if os.path.isfile(os.path.join(folder, name)) else {}
                for name in (RUN_CONFIG, TEST_RESULTS)}
    config = optional[RUN_CONFIG]
    name = config.get("run_name") or os.path.basename(os.path.normpath(os.path.abspath(folder)))
    return Run(folder, name, read_metrics(os.path.join(folder, METRICS)), results, config, optional[TEST_RESULTS])


def best_evaluation(run: Run) -> dict | None:
    """The dev record of the best step (the last one, should a resumed run have logged that step twice)."""
    return next((r for r in reversed(run.records) if r["step"] == run.results["best_step"] and "dev/accuracy" in r),
                None)


def metric(value: float | None, digits: int = 4) -> str | None:
    """How report.md writes a metric: fixed decimals (4 for scores, 1 for samples/s)."""
    return None if value is None else f"{value:.{digits}f}"


def _cell(value) -> str:
    if value is None:
        return "-"
    text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text.replace("|", "\\|")  # a pipe would split the markdown cell


def _table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table, closed by a blank line (a text line right below would be read as one more row)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows] + [""]


def render_markdown(runs: list[Run]) -> str:
    """report.md: best metrics per run, settings (or their differences), best confusion matrices, the figure."""
    header = ["run", "best step", "best epoch", "dev accuracy", "dev F1", "dev precision", "dev recall"]
    rows = [[run.name, run.results["best_step"], run.results.get("best_epoch"),
             *(metric(run.results.get(f"dev_{k}")) for k in ("accuracy", "f1", "precision", "recall"))]
            for run in runs]
    if any(run.test for run in runs):
        header += ["test accuracy", "test F1"]
        for row, run in zip(rows, runs):
            row += [metric(run.test.get("test_accuracy")), metric(run.test.get("test_f1"))]
    header.append("train samples/s")
    for row, run in zip(rows, runs):
        row.append(metric(run.results.get("train_samples_per_second"), 1))
    lines = ["# Training report", "", *_table(header, rows)]

    configured = [run for run in runs if run.config]  # runs from before run_config.json existed have none
    if len(runs) == 1:
        lines += ["## Settings", ""]
        if configured:
            lines += _table(["setting", "value"], [[k, runs[0].config[k]] for k in KEY_SETTINGS if k in runs[0].config])
    else:
        keys = sorted({k for run in configured for k in run.config} - PER_RUN_KEYS)
        differing = [k for k in keys if len({json.dumps(run.config.get(k)) for run in configured}) > 1]
        lines += ["## Settings that differ", ""]
        lines += (_table(["setting", *(run.name for run in configured)],
                         [[k, *(run.config.get(k) for run in configured)] for k in differing])
                  if differing else ["None.", ""])
    if len(configured) < len(runs):
        lines += [f"No {RUN_CONFIG} in " + ", ".join(run.name for run in runs if not run.config) + ".", ""]

    lines += ["## Confusion matrix of the best evaluation (rows: true label, columns: predicted)", ""]
    for run in runs:
        best = best_evaluation(run)
        if best is None or "dev/confusion_matrix" not in best:
            lines += [f"**{run.name}**: no dev record of step {run.results['best_step']} in {METRICS}", ""]
            continue
        matrix = best["dev/confusion_matrix"]
        labels = run.config.get("label_list") or []
        labels = labels if len(labels) == len(matrix) else list(range(len(matrix)))
        lines += [f"**{run.name}** (step {best['step']}, epoch {_cell(best.get('epoch'))})", "",
                  *_table(["true \\ predicted", *map(str, labels)], [[label, *row] for label, row in
                                                                     zip(labels, matrix)])]
    lines += ["## Curves", "", f"![training curves]({REPORT_PNG})", ""]
    return "\n".join(lines)


def majority_accuracy(run: Run) -> float | None:
    """The dev accuracy of always answering the most frequent label (from the best evaluation's confusion matrix:
    rows are true labels), the bar a model must clear on an unbalanced set such as AFQMC's (69% "0")."""
    best = best_evaluation(run)
    matrix = (best or {}).get("dev/confusion_matrix")
    total = sum(map(sum, matrix)) if matrix else 0
    return max(map(sum, matrix)) / total if total else None


def draw(runs: list[Run]):
    """The report's figure (a matplotlib Figure on the Agg canvas). UserError without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise UserError(f"{REPORT_PNG} needs matplotlib: pip install matplotlib") from None
    # A bare Figure on the Agg canvas: no pyplot, so no display and no global state touched.
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    names = ", ".join(run.name for run in runs)
    fig.suptitle(f"training report: {names if len(names) <= 80 else f'{len(runs)} runs'}", fontsize=13)
    axes = fig.subplots(2, 2).flatten()
    for ax, (key, title) in zip(axes, PANELS):
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        for i, run in enumerate(runs):
            points = [(r["step"], r[key]) for r in run.records if key in r]
            if points:
                ax.plot(*zip(*points), color=f"C{i % 10}", marker="." if len(points) < 40 else None,
                        label=run.name)
            best = best_evaluation(run)
            if key.startswith("dev/") and best is not None and key in best:  # the evaluation that best/ holds
                ax.plot(best["step"], best[key], "*", color=f"C{i % 10}", markersize=12)
        if key == "train/learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))  # 2e-5, not 0.00002
    baselines = sorted({b for b in map(majority_accuracy, runs) if b is not None})
    accuracy_axis = axes[[key for key, _ in PANELS].index("dev/accuracy")]
    for value in baselines:
        accuracy_axis.axhline(value, color="grey", linestyle="--", linewidth=1,
                              label=f"majority guess ({value:.3f})")
        accuracy_axis.annotate(f"majority guess {value:.3f}", (0, value), xycoords=("axes fraction", "data"),
                               xytext=(4, 3), textcoords="offset points", color="grey", fontsize=8)
    # One legend for the figure, built from the runs (a run may lack points in any one panel).
    handles = [Line2D([], [], color=f"C{i % 10}", label=run.name) for i, run in enumerate(runs)]
    handles.append(Line2D([], [], color="grey", marker="*", markersize=12, linestyle="none",
                          label="best evaluation (best/)"))
    if baselines:
        handles.append(Line2D([], [], color="grey", linestyle="--", label="majority-label guess"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 5))
    return fig


def render_png(runs: list[Run], path: str) -> None:
    """Draw the curves of every run into `path` (PNG, through a temporary file). Needs matplotlib."""
    save_png(draw(runs), path)


def report(folders: list[str], output_dir: str | None = None) -> None:
    """Write report.md, then report.png, for the runs in `folders`, printing each path once it is written.

    `output_dir` defaults to the run's folder for one run, else the current directory. Nothing is written unless
    every run reads correctly; report.md is kept if the figure cannot be drawn (no matplotlib)."""
    runs = [load_run(folder) for folder in folders]
    if len({run.name for run in runs}) < len(runs):  # two folders called `out`: name them by their path
        for run in runs:
            run.name = run.folder
    output_dir = output_dir or (folders[0] if len(folders) == 1 else ".")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {output_dir}: cannot create it ({e})") from None
    md, png = os.path.join(output_dir, REPORT_MD), os.path.join(output_dir, REPORT_PNG)
    try:
        with atomic_open(md) as f:
            f.write(render_markdown(runs))
    except OSError as e:
        raise UserError(f"cannot write {md}: {e}") from None
    print(f"wrote {md}")
    render_png(runs, png)
    print(f"wrote {png}")


def run(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="python -m afqmc_dist.report", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="OUTPUT_DIR",
                        help="a training run's --output_dir, or one sweep folder (see sweep.py)")
    parser.add_argument("--output_dir", help="where the report goes (default: the run's or sweep's folder for "
                                             "one, else the current directory)")
    parser.add_argument("--storage", help="a sweep's study storage URL, if not the one in SWEEP_DIR/sweep.json "
                                          "(e.g. with its password)")
    args = parser.parse_args(argv)
    sweeps = [folder for folder in args.runs if os.path.isfile(os.path.join(folder, SWEEP_MARKER))]
    if sweeps and len(args.runs) > 1:
        raise UserError(f"{sweeps[0]} is a sweep folder: report it on its own")
    if sweeps:
        from .sweep.report import report as sweep_report  # Optuna and the sweep code: only for a sweep

        sweep_report(sweeps[0], args.output_dir, args.storage)
    elif args.storage:
        raise UserError("--storage is for a sweep folder (one with sweep.json)")
    else:
        report(args.runs, args.output_dir)


def main(argv: list[str] | None = None) -> int:
    """Run the report; return the exit status (0 written, 2 for an error, printed as one line)."""
    return run_command(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
