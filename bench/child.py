"""A measurement's own process: `python -m bench.child KIND SPEC_FILE` (started by children.py) runs the worker
of that kind on the spec and writes its result dict to spec["result_file"]."""

from __future__ import annotations

import json
import sys

from bench.common import RowFailed


def workers() -> dict:
    """Worker kind -> function(spec) -> result dict. Imported here, in the child, only."""
    from bench.measure import worker_peak
    from bench.tool_loop import worker_tool
    from bench.trainer_loop import worker_trainer
    from bench.tutorial_loop import worker_tutorial

    return {"tutorial": worker_tutorial, "trainer": worker_trainer, "tool": worker_tool, "peak": worker_peak}


def run_worker(kind: str, spec_file: str) -> int:
    """Run one measurement and write its result to spec["result_file"]."""
    with open(spec_file, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        result = workers()[kind](spec)
    except RowFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    with open(spec["result_file"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run_worker(*sys.argv[1:3]))
