"""The README's quick start runs as written, offline, on the sample data, and shows every stage."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT, read_jsonl


def readme_block(name: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(rf"<!-- {name}:start -->\s*```bash\n(.*?)```\s*<!-- {name}:end -->", readme, re.DOTALL)
    assert block, f"README.md lost its {name} block"
    return block.group(1)


def quickstart_commands() -> str:
    return readme_block("quickstart")


def test_readme_setup_installs_the_pinned_torch_first_then_the_requirements_that_keep_it():
    """CI (.ci/run) runs this block as written in a fresh clone; here, that its order is the one that works: the
    torch build chosen first, at the version requirements.txt pins (which then leaves it alone)."""
    commands = [line.split("#")[0].strip() for line in readme_block("setup").splitlines() if line.strip()]
    pinned = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch=="))
    torch_at = next(i for i, c in enumerate(commands) if c.startswith("pip install torch"))
    requirements_at = next(i for i, c in enumerate(commands) if c == "pip install -r requirements.txt")
    assert commands[torch_at] == f"pip install {pinned}" and torch_at < requirements_at
    assert commands[0].startswith("python3 -m venv .venv")


def test_readme_quickstart_runs_the_whole_pipeline(tmp_path):
    # Same commands, with the model and outputs folders moved into the test's temporary folder.
    commands = quickstart_commands().replace("models/", f"{tmp_path}/models/").replace("outputs/", f"{tmp_path}/o/")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "o" / "quickstart"
    assert (out / "best" / "model.safetensors").is_file()
    assert json.loads((out / "results.json").read_text())["dev_count"] == 61
    assert json.loads((out / "test_results.json").read_text())["test_count"] == 60
    submission = read_jsonl(out / "afqmc_predict.json")
    assert [row["id"] for row in submission] == list(range(60))
    assert len(read_jsonl(out / "predictions.jsonl")) == 60
