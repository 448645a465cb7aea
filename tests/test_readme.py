"""The README's quick start runs as written, offline, on the sample data, and shows every stage."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT, read_jsonl


def quickstart_commands() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- quickstart:start -->\s*```bash\n(.*?)```\s*<!-- quickstart:end -->", readme, re.DOTALL)
    assert block, "README.md lost its quick-start block"
    return block.group(1)


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
