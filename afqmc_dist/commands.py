"""The tool's commands as `pip install` makes them (pyproject.toml, [project.scripts]): each takes stop signals
from its first moment (errors.stop_while_starting) and only then imports its module, whose `main` it runs. The
same commands run as `python train.py` and `python -m afqmc_dist.<module>`.

    afqmc-train     train.py                          afqmc-sweep      python -m afqmc_dist.sweep
    afqmc-predict   python -m afqmc_dist.predict      afqmc-launch     python -m afqmc_dist.launcher
    afqmc-report    python -m afqmc_dist.report       afqmc-download   python -m afqmc_dist.download
    afqmc-restore   python -m afqmc_dist.restore      afqmc-tiny-model python -m afqmc_dist.tiny_model
    afqmc-export    python -m afqmc_dist.export       afqmc-kfold      python -m afqmc_dist.kfold
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .errors import stop_while_starting


def _command(module: str) -> Callable[[], int]:
    def main() -> int:
        stop_while_starting()
        return importlib.import_module(f"afqmc_dist.{module}").main()

    main.__name__ = module.rsplit(".", 1)[-1]
    return main


train = _command("cli")
predict = _command("predict")
report = _command("report")
sweep = _command("sweep.__main__")
launch = _command("launcher")
download = _command("download")
restore = _command("restore")
tiny_model = _command("tiny_model")
export = _command("export.__main__")
kfold = _command("kfold.__main__")
