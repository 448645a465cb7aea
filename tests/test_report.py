"""`python -m afqmc_dist.report` turns real run folders into report.png and report.md, or refuses in one line."""

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ROOT, limit, read_jsonl, requires, run_tool, train_args

from afqmc_dist.report import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tiny_model, synthetic_data, tmp_path_factory):
    """Two short real runs that differ only in learning rate, trained side by side: {learning rate: folder}."""
    root = tmp_path_factory.mktemp("report-runs")
    runs = {lr: root / f"lr{lr}" for lr in ("1e-3", "3e-3")}
    short = ("--num_train_epochs", "2", "--max_train_samples", "96", "--logging_steps", "4", "--eval_steps", "4")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda lr: run_tool(train_args(tiny_model, synthetic_data, runs[lr], *short,
                                                               "--learning_rate", lr)), runs))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return runs


def copy_run(run, dest):
    """A run's files without its model: reports written there leave the shared run untouched."""
    return shutil.copytree(run, dest, ignore=shutil.ignore_patterns("best"))


def table_row(markdown: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row that starts with `first_cell`."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"one row for {first_cell!r} expected in:\n{markdown}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@requires("matplotlib")
def test_two_runs_are_overlaid_in_one_png_and_compared_in_report_md(two_runs, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "compare"
    assert main([*map(str, two_runs.values()), "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "report.png"]  # no temporary file left

    png = out / "report.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert png.stat().st_size > 20_000
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 600
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10, "the figure is a blank canvas"

    md = (out / "report.md").read_text(encoding="utf-8")
    for run in two_runs.values():
        results = json.loads((run / "results.json").read_text())
        test = json.loads((run / "test_results.json").read_text())
        expected = [run.name, str(results["best_step"]), str(results["best_epoch"]),
                    *(f"{results[f'dev_{k}']:.4f}" for k in ("accuracy", "f1", "precision", "recall")),
                    f"{test['test_accuracy']:.4f}", f"{test['test_f1']:.4f}",
                    f"{results['train_samples_per_second']:.1f}"]
        assert table_row(md, run.name) == expected
    # Only what differs between the runs, and never their output folders.
    assert table_row(md, "learning_rate") == ["learning_rate", "0.001", "0.003"]
    differences = md.split("## Settings that differ")[1].split("##")[0]
    assert "output_dir" not in differences and "seed" not in differences
    assert "![training curves](report.png)" in md
    assert capsys.readouterr().out.splitlines() == [f"wrote {out / 'report.md'}", f"wrote {png}"]


@requires("matplotlib")
def test_one_run_is_reported_in_its_own_folder_with_the_confusion_matrix_of_its_best_evaluation(two_runs, tmp_path):
    run = copy_run(two_runs["1e-3"], tmp_path / "run")
    assert main([str(run)]) == 0
    assert (run / "report.png").read_bytes().startswith(PNG_SIGNATURE)
    md = (run / "report.md").read_text(encoding="utf-8")

    best_step = json.loads((run / "results.json").read_text())["best_step"]
    best = [r for r in read_jsonl(run / "metrics.jsonl") if r["step"] == best_step and "dev/accuracy" in r][-1]
    labels = json.loads((run / "run_config.json").read_text())["label_list"]
    assert table_row(md, "true \\ predicted") == ["true \\ predicted", *labels]
    for label, counts in zip(labels, best["dev/confusion_matrix"]):
        assert table_row(md, label) == [label, *map(str, counts)]
    assert sum(map(sum, best["dev/confusion_matrix"])) == best["dev/count"]
    assert table_row(md, "learning_rate") == ["learning_rate", "0.001"]  # one run: its settings


def test_a_folder_that_is_not_a_run_is_refused_in_one_line_and_nothing_is_written(two_runs, tmp_path, capsys):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    out = tmp_path / "out"
    # The good run comes first: it must not be reported alone.
    assert main([str(two_runs["1e-3"]), str(not_a_run), "--output_dir", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {not_a_run}: no metrics.jsonl (is it a training output folder?)"]
    assert not out.exists()
    assert main([str(not_a_run)]) == 2
    assert list(not_a_run.iterdir()) == []


def test_a_malformed_metrics_line_is_named_by_file_and_line(two_runs, tmp_path, capsys):
    run = copy_run(two_runs["1e-3"], tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:-5]  # as if the line had been cut off
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main([str(run)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run / 'metrics.jsonl'}:3: not valid JSON")
    assert not (run / "report.md").exists() and not (run / "report.png").exists()


def test_without_matplotlib_report_md_is_written_and_one_line_says_how_to_get_the_png(two_runs, tmp_path):
    run = copy_run(two_runs["1e-3"], tmp_path / "run")
    # sys.modules[name] = None is how Python marks a module unimportable: `import matplotlib` raises ImportError.
    code = ("import sys; sys.modules['matplotlib'] = None; from afqmc_dist.report import main; "
            f"sys.exit(main([{str(run)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=limit(120))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: report.png needs matplotlib: pip install matplotlib"]
    assert (run / "report.md").is_file() and not (run / "report.png").exists()


def test_a_sweep_folder_is_reported_on_its_own_and_storage_is_for_sweeps_only(two_runs, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"study_name": "s", "storage": "sqlite:///nowhere.db"}))
    assert main([str(two_runs["1e-3"]), str(sweep)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {sweep} is a sweep folder: report it on its own"]
    assert main([str(two_runs["1e-3"]), "--storage", "sqlite:///x.db"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --storage is for a sweep folder (one with sweep.json)"]
    assert sorted(p.name for p in sweep.iterdir()) == ["sweep.json"]


@requires("matplotlib")
def test_the_figure_has_a_title_a_majority_guess_line_and_a_learning_rate_in_powers_of_ten(two_runs):
    from matplotlib.ticker import ScalarFormatter

    from afqmc_dist.report import draw, load_run, majority_accuracy

    runs = [load_run(str(folder)) for folder in two_runs.values()]
    fig = draw(runs)

    assert fig.get_suptitle() == f"training report: {runs[0].name}, {runs[1].name}"
    axes = {ax.get_title(): ax for ax in fig.axes}
    matrix = [r for r in runs[0].records if "dev/confusion_matrix" in r][-1]["dev/confusion_matrix"]
    expected = max(map(sum, matrix)) / sum(map(sum, matrix))
    assert majority_accuracy(runs[0]) == pytest.approx(expected)
    assert any(line.get_label() == f"majority guess ({expected:.3f})" for line in axes["dev accuracy"].lines)
    formatter = axes["learning rate"].yaxis.get_major_formatter()
    assert isinstance(formatter, ScalarFormatter) and formatter._scientific and formatter._powerlimits == (0, 0)
