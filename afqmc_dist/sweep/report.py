"""The report of a sweep folder: sweep.md, sweep.png and best_config.yaml (`python -m afqmc_dist.report SWEEP_DIR`).

- sweep.md: the study's state; the best configuration with its per-seed values and a ready command line; every
  finished trial ranked by its mean over seeds (± standard deviation, each seed's value, the searched values, its
  state and time); pruned and failed trials below, with why.
- sweep.png: the objective against each searched option over its whole range (one point per complete trial, bars:
  seed standard deviation; pruned trials as crosses at their last reported value), the best value so far over the
  trials in the order they finished, and the seed spread of the top trials.
- best_config.yaml: the best trial's first seed run's options, as train.py takes them: `python train.py
  SWEEP_DIR/best_config.yaml` trains that run again (into SWEEP_DIR/best-run) and, on the same hardware,
  reproduces its dev metrics exactly. Change `seed` for the trial's other seeds.

The study is read from the storage named in SWEEP_DIR/sweep.json (`--storage` to give it, e.g. with a password).
Every file is written atomically, after everything has been read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

from ..errors import UserError, first_line, mask_secrets
from ..files import atomic_open, save_png
from .ledger import Ledger
from .runs import trial_dir
from .study import IDENTITY_ATTR, STUDY_DB, SWEEP_JSON, folder_storage, make_storage

SWEEP_MD, SWEEP_PNG, BEST_CONFIG, BEST_RUN = "sweep.md", "sweep.png", "best_config.yaml", "best-run"
TOP_TRIALS = 8  # in the seed-spread panel


def is_sweep_dir(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, SWEEP_JSON))


@dataclass
class Row:
    """One finished trial (slot) of the study, as the report shows it."""

    slot: int
    state: str  # complete | pruned | failed
    value: float | None  # mean over seeds (complete), or the last reported value (pruned)
    std: float | None
    seed_values: dict  # seed (str) -> value
    params: dict
    seconds: float  # all attempts together
    attempts: int
    note: str  # why pruned / failed
    finished_at: float  # for the best-so-far curve


@dataclass
class Sweep:
    folder: str
    study_name: str
    storage: str
    identity: dict
    n_trials: int | None
    counts: dict
    rows: list[Row]  # ranked: complete by value, then pruned, then failed

    @property
    def objective(self) -> str:
        return self.identity.get("objective", "dev_accuracy")

    @property
    def maximize(self) -> bool:
        return self.objective != "dev_loss"

    @property
    def searched(self) -> list[str]:
        return [p["name"] for p in self.identity.get("search_space", [])]

    @property
    def best(self) -> Row | None:
        return self.rows[0] if self.rows and self.rows[0].state == "complete" else None


def load_sweep_dir(folder: str, storage: str | None = None) -> Sweep:
    """Read the study of a sweep folder; UserError if it cannot be read."""
    try:
        with open(os.path.join(folder, SWEEP_JSON), encoding="utf-8") as f:
            info = json.load(f)
        name, stored = info["study_name"], info["storage"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{os.path.join(folder, SWEEP_JSON)}: cannot read it ({first_line(e)})") from None
    url = storage or folder_storage(folder, stored)
    if storage is None and stored == STUDY_DB and not os.path.isfile(os.path.join(folder, STUDY_DB)):
        raise UserError(f"{folder}: no {STUDY_DB}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(url))
        trials = study.get_trials(deepcopy=False)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a missing study, a refused connection, a missing driver
        raise UserError(f"{folder}: cannot read study {name!r} from {mask_secrets(url)}: {first_line(e)} "
                        "(give the storage with --storage)") from None
    identity = study.user_attrs.get(IDENTITY_ATTR, {})
    ledger = Ledger(trials)
    rows = [_row(ledger, slot) for slot in sorted(ledger.slots) if ledger.state(slot) in ("complete", "pruned",
                                                                                          "failed")]
    sign = -1 if identity.get("objective", "dev_accuracy") != "dev_loss" else 1
    order = {"complete": 0, "pruned": 1, "failed": 2}
    rows.sort(key=lambda r: (order[r.state], sign * r.value if r.value is not None else 0.0, r.slot))
    n_trials = _stored_n_trials(folder)
    return Sweep(folder, name, mask_secrets(url), identity, n_trials, ledger.counts(), rows)


def _stored_n_trials(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, "sweep.yaml"), encoding="utf-8") as f:
            value = (yaml.safe_load(f) or {}).get("n_trials")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _row(ledger: Ledger, slot: int) -> Row:
    chain = ledger.slots[slot]
    latest = chain[-1]
    state = ledger.state(slot)
    attrs = latest.user_attrs
    value = latest.value if state == "complete" else None
    if state == "pruned" and latest.intermediate_values:
        value = latest.intermediate_values[max(latest.intermediate_values)]
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in chain
                  if t.datetime_complete and t.datetime_start)
    note = attrs.get("pruned") or attrs.get("error") or ""
    return Row(slot, state, value, attrs.get("std"), attrs.get("seed_values", {}), dict(latest.params), seconds,
               len(chain), note, latest.datetime_complete.timestamp() if latest.datetime_complete else 0.0)


def _fmt(value, digits: int = 4) -> str:
    """A metric with `digits` decimals; other numbers (searched values) with 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if digits == 4 else f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    cells = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header), *("| " + " | ".join(r) + " |"
                                                                             for r in cells), ""]


def best_config(sweep: Sweep) -> tuple[dict, str] | None:
    """The options of the best trial's first seed run, ready for train.py, and the header comment."""
    best = sweep.best
    if best is None:
        return None
    seeds = list(best.seed_values)
    run = os.path.join(trial_dir(sweep.folder, best.slot), f"seed-{seeds[0]}")
    try:
        with open(f"{run}.yaml", encoding="utf-8") as f:
            options = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{run}.yaml: cannot read the best run's options ({first_line(e)})") from None
    options.pop("resume_from_checkpoint", None)
    options["output_dir"] = os.path.abspath(os.path.join(sweep.folder, BEST_RUN))
    options["run_name"] = f"{sweep.study_name}-best"
    per_seed = ", ".join(f"seed {s}: {_fmt(v)}" for s, v in best.seed_values.items())
    header = (f"# The best trial of sweep study {sweep.study_name}: trial {best.slot}, {sweep.objective} "
              f"{_fmt(best.value)} ± {_fmt(best.std)} ({per_seed}).\n"
              f"# python train.py {os.path.join(sweep.folder, BEST_CONFIG)} trains its seed-{seeds[0]} run again "
              f"({os.path.relpath(run, sweep.folder)}) into output_dir;\n"
              "# change seed for the others. Paths are absolute, as on the machine that ran the sweep.\n")
    return options, header


def render_markdown(sweep: Sweep) -> str:
    objective = sweep.objective
    finished = sum(sweep.counts.get(k, 0) for k in ("complete", "pruned", "failed"))
    target = f" of {sweep.n_trials}" if sweep.n_trials else ""
    lines = [f"# Sweep report: study {sweep.study_name}", "",
             f"{finished}{target} trials finished (" + ", ".join(f"{n} {k}" for k, n in sweep.counts.items())
             + f"). Objective: {objective} ({'higher' if sweep.maximize else 'lower'} is better), the mean over "
             f"seeds {', '.join(map(str, sweep.identity.get('seeds', [])))}. Storage: {sweep.storage}.", ""]
    best = sweep.best
    lines += ["## Best configuration", ""]
    if best is None:
        lines += ["No trial is complete yet.", ""]
    else:
        lines += [f"Trial {best.slot}: **{objective} {_fmt(best.value)} ± {_fmt(best.std)}** (" +
                  ", ".join(f"seed {s}: {_fmt(v)}" for s, v in best.seed_values.items()) + ")", "",
                  *_table(["option", "value"], [[k, _fmt(v, 0)] for k, v in best.params.items()]),
                  "```bash", f"python train.py {os.path.join(sweep.folder, BEST_CONFIG)}", "```", "",
                  (f"trains its first seed's run again ({BEST_CONFIG}: the base options, these values and "
                   f"`seed: {next(iter(best.seed_values))}`; output in {os.path.join(sweep.folder, BEST_RUN)})."),
                  ""]
    seeds = [str(s) for s in sweep.identity.get("seeds", [])]
    header = ["rank", "trial", "state", f"{objective} mean ± std", *(f"seed {s}" for s in seeds), *sweep.searched,
              "time"]
    rows = []
    for rank, row in enumerate(sweep.rows, 1):
        mean = f"{_fmt(row.value)} ± {_fmt(row.std)}" if row.state == "complete" else (
            f"({_fmt(row.value)} when pruned)" if row.value is not None else "-")
        attempts = f" ({row.attempts} attempts)" if row.attempts > 1 else ""
        rows.append([str(rank) if row.state == "complete" else "-", f"{row.slot}{attempts}", row.state, mean,
                     *(_fmt(row.seed_values.get(s)) for s in seeds), *(_fmt(row.params.get(p), 0)
                                                                      for p in sweep.searched),
                     f"{row.seconds:.0f} s"])
    lines += [f"## Trials, ranked by mean {objective}", "", *_table(header, rows)]
    notes = [f"- trial {r.slot} ({r.state}): {r.note}" for r in sweep.rows if r.state != "complete" and r.note]
    if notes:
        lines += ["Pruned and failed trials:", "", *notes, ""]
    lines += ["## Figure", "", f"![sweep]({SWEEP_PNG})", ""]
    return "\n".join(lines)


def render_png(sweep: Sweep, path: str) -> None:
    """Objective against each searched option, best so far, seed spread of the top trials. Needs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        raise UserError(f"{SWEEP_PNG} needs matplotlib: pip install matplotlib") from None
    complete = [r for r in sweep.rows if r.state == "complete"]
    pruned = [r for r in sweep.rows if r.state == "pruned" and r.value is not None]
    space = {p["name"]: p for p in sweep.identity.get("search_space", [])}
    panels = len(space) + 2
    columns = min(3, panels)
    rows = -(-panels // columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    label = sweep.objective.replace("_", " ")
    for ax, (name, param) in zip(axes, space.items()):
        categorical = param.get("kind") == "categorical"
        choices = [str(c) for c in param.get("choices", [])]

        def x(row, name=name, categorical=categorical, choices=choices):
            value = row.params.get(name)
            return choices.index(str(value)) if categorical and str(value) in choices else value

        if categorical:
            ax.set_xticks(range(len(choices)), choices)
            ax.set_xlim(-0.5, len(choices) - 0.5)
        else:
            if param.get("log"):
                ax.set_xscale("log")
                # Ticks at 1, 2 and 5 x 10^k, written plainly: the default labels of the minor ticks overlap.
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            margin = 0.0 if param.get("log") else 0.03 * (param["high"] - param["low"])
            ax.set_xlim(param["low"] - margin, param["high"] + margin)  # the whole searched range
        ax.errorbar([x(r) for r in complete], [r.value for r in complete], yerr=[r.std or 0 for r in complete],
                    fmt="o", color="C0", alpha=0.8, capsize=3)
        ax.plot([x(r) for r in pruned], [r.value for r in pruned], "x", color="grey")
        if sweep.best is not None:
            ax.plot(x(sweep.best), sweep.best.value, "*", color="C3", markersize=14)
        ax.set(title=f"{label} vs {name}", xlabel=name, ylabel=label)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color="C0", marker="o", label="trial: mean over seeds, bar: seed std"),
               Line2D([], [], color="C3", marker="*", markersize=12, linestyle="none", label="best trial"),
               Line2D([], [], color="grey", marker="x", linestyle="none", label="pruned (value when pruned)")]
    fig.legend(handles=handles, loc="outside upper center", ncols=3)
    ax = axes[len(space)]
    ordered = sorted(complete, key=lambda r: r.finished_at)
    running, best_so_far = None, []
    for r in ordered:
        running = r.value if running is None else (max if sweep.maximize else min)(running, r.value)
        best_so_far.append(running)
    xs = range(1, len(ordered) + 1)
    ax.plot(xs, [r.value for r in ordered], "o", color="C0", alpha=0.6, label="trial mean")
    ax.step(xs, best_so_far, where="post", color="C3", label="best so far")
    ax.set(title="best so far", xlabel="complete trials, in the order they finished", ylabel=label)
    ax.legend(loc="lower right" if sweep.maximize else "upper right")
    ax.grid(alpha=0.3)
    ax = axes[len(space) + 1]
    top = complete[:TOP_TRIALS]
    for i, r in enumerate(top):
        seed_values = list(r.seed_values.values())
        ax.plot([i] * len(seed_values), seed_values, "o", color="C0", alpha=0.7)
        ax.plot([i - 0.3, i + 0.3], [r.value, r.value], color="C3")
    ax.set_xticks(range(len(top)), [str(r.slot) for r in top])
    ax.set(title=f"seed spread of the top {len(top)} trials", xlabel="trial (best first)", ylabel=label)
    ax.grid(alpha=0.3)
    for ax in axes[panels:]:
        ax.set_visible(False)
    save_png(fig, path)


def report(folder: str, output_dir: str | None = None, storage: str | None = None) -> None:
    """Write sweep.md, best_config.yaml (when a trial is complete) and sweep.png for the sweep in `folder`."""
    sweep = load_sweep_dir(folder, storage)
    output_dir = output_dir or folder
    try:
        os.makedirs(output_dir, exist_ok=True)
        best = best_config(sweep)
        with atomic_open(os.path.join(output_dir, SWEEP_MD)) as f:
            f.write(render_markdown(sweep))
        print(f"wrote {os.path.join(output_dir, SWEEP_MD)}")
        if best is not None:
            with atomic_open(os.path.join(output_dir, BEST_CONFIG)) as f:
                f.write(best[1] + yaml.safe_dump(best[0], allow_unicode=True, sort_keys=False))
            print(f"wrote {os.path.join(output_dir, BEST_CONFIG)}")
    except OSError as e:
        raise UserError(f"--output_dir {output_dir}: cannot write the report ({first_line(e)})") from None
    render_png(sweep, os.path.join(output_dir, SWEEP_PNG))
    print(f"wrote {os.path.join(output_dir, SWEEP_PNG)}")
