"""`python train.py` (or `afqmc-train`): fine-tune, test and predict. The flags, the config file and the paths
are checked before torch, transformers and accelerate are imported (seconds), so that a mistyped flag is answered
at once; run.py then does the work, phase by phase.

    python train.py --model_checkpoint bert-base-chinese --train_file train.json --dev_file dev.json \\
        --test_file test.json --output_dir outputs/afqmc --do_train --do_predict
    accelerate launch --config_file accelerate_config.yaml train.py ...     # any number of processes
"""

from __future__ import annotations

from .arguments import parse_config
from .preemption import run_command


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit status (see errors.py): 2 for a user error, printed as one `error:` line."""
    def work(stop_requests) -> None:
        cfg = parse_config(argv)
        from .run import run  # the heavy imports, once the flags are known to be good

        run(cfg, stop_requests)

    return run_command(work)
