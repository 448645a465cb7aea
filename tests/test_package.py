"""The package as a newcomer meets it: the commands `pip install` gives, flags answered before the heavy imports,
modules that import one another without cycles, and functions short enough to read in one sitting."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, limit

PACKAGES = ("afqmc_dist", "bench")
LONGEST_FUNCTION = 80  # lines


def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def test_every_command_points_at_a_main_that_exists():
    for name, target in scripts().items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


@pytest.mark.parametrize("name", sorted(scripts()))
def test_every_installed_command_answers_help(name):
    """`pip install -e .` (the README's set-up) puts the commands beside the interpreter."""
    command = shutil.which(name, path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip(f"{name} is not installed here: pip install -e .")
    result = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=limit(120))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


@pytest.mark.parametrize(("module", "argv", "error"), [
    ("afqmc_dist.cli", ["--learning_rat", "1e-3"], "unknown option --learning_rat (did you mean --learning_rate?)"),
    ("afqmc_dist.cli", ["--output_dir", "o", "--do_test", "--test_file", "no/such.json"], "no such file"),
    ("afqmc_dist.predict", ["--bogus", "--model", "m"], "unrecognized arguments: --bogus"),
    ("afqmc_dist.sweep.__main__", ["s.yaml"], "the following arguments are required: --output_dir"),
    ("afqmc_dist.report", [], "the following arguments are required: OUTPUT_DIR"),
    ("afqmc_dist.kfold.__main__", ["c.yaml"], "the following arguments are required: --folds, --output_dir"),
])
def test_a_bad_flag_is_answered_before_torch_and_transformers_models_are_imported(module, argv, error):
    """A mistyped flag used to wait 5-6 s (25-38 s on a busy machine) for torch and transformers to load."""
    heavy = ("torch", "accelerate", "transformers.modeling_utils", "optuna")
    code = (f"import sys; from {module} import main; status = main({argv!r}); "
            f"print(status, [m for m in {heavy!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=limit(120))
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr[-2000:]
    assert error in result.stderr


def _modules() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, anywhere in it (inside functions too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name if is_package else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = ".".join(filter(None, [base if node.level else "", node.module or ""]))
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def test_no_module_imports_one_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    # A package's __init__ is imported by its submodules' imports: it must import none of them.
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in trail:
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in done:
                visit(target, [*trail, target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_function_of_the_package_is_longer_than_a_screen():
    long = []
    for path in sorted((ROOT / "afqmc_dist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
