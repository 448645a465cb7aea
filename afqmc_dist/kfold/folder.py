"""The k-fold's folder D, tied to one k-fold by D/kfold.json.

kfold.json records what the folds and their runs depend on: K, the seed, the training file and the sha256 of its
content, and the run options of the config file. A rerun with any of them different would mix runs of two k-folds
(a fold kept from the first is not a fold of the second), so it is refused, naming the first difference, and
nothing in D is touched. What may change between runs of the command: --workers, --launcher and the heartbeat
settings. A non-empty D without kfold.json is not a k-fold's, and is refused too (never written into).

The study's name (the sweep's `study_name`, which names the runs in the trackers) is D's name when D is made, and is
kept in kfold.json, so that a D moved or renamed continues the same study.
"""

from __future__ import annotations

import json
import os
import re

from filelock import FileLock

from ..errors import UserError, first_line
from ..files import write_json

KFOLD_JSON, RUNS_DIR, LOCK_FILE = "kfold.json", "runs", ".kfold.lock"
OOF_PREDICTIONS, CV_MD, ENSEMBLE_JSON = "oof_predictions.jsonl", "cv.md", "ensemble.json"


def check_folder(output_dir: str, identity: dict) -> str:
    """Check that D is new, empty, or this k-fold's (UserError otherwise); return the study name."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} exists and is not a folder")
    marker = os.path.join(output_dir, KFOLD_JSON)
    if not os.path.isfile(marker):
        if os.path.isdir(output_dir) and set(os.listdir(output_dir)) - {LOCK_FILE}:
            raise UserError(f"--output_dir {output_dir} is not empty and not a k-fold's folder (no {KFOLD_JSON}); "
                            "use a new folder")
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", os.path.basename(os.path.normpath(os.path.abspath(output_dir))))
        return name.strip("-.") or "kfold"
    try:
        with open(marker, encoding="utf-8") as f:
            recorded = json.load(f)
        name = recorded["study_name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{marker}: cannot read it ({first_line(e)})") from None
    difference = _difference(recorded, identity)
    if difference:
        raise UserError(f"--output_dir {output_dir} holds a k-fold made with {difference}; use a new --output_dir "
                        "(or the same settings to continue that one)")
    return name


def _difference(recorded: dict, identity: dict) -> str | None:
    """The first thing a k-fold recorded in kfold.json differs in from this one, in words; None if none."""
    new = json.loads(json.dumps(identity))  # as stored: tuples become lists
    if recorded.get("folds") != new["folds"]:
        return f"--folds {recorded.get('folds')}, not {new['folds']}"
    if recorded.get("seed") != new["seed"]:
        return f"--seed {recorded.get('seed')}, not {new['seed']}"
    if recorded.get("train_file") != new["train_file"]:
        return f"the training file {recorded.get('train_file')}, not {new['train_file']}"
    if recorded.get("train_sha256") != new["train_sha256"]:
        return f"another content of {new['train_file']} (it changed since: sha256 {new['train_sha256'][:12]} now)"
    old_config, config = recorded.get("config") or {}, new["config"]
    for key in sorted(set(old_config) | set(config)):
        if old_config.get(key, "(not set)") != config.get(key, "(not set)"):
            return (f"another config: {key} was {json.dumps(old_config.get(key, '(not set)'))}, is "
                    f"{json.dumps(config.get(key, '(not set)'))} now")
    return None


def mark_folder(output_dir: str, identity: dict, study_name: str) -> None:
    """Write kfold.json (once: a rerun has checked it is the same). Call under D's lock (`folder_lock`)."""
    marker = os.path.join(output_dir, KFOLD_JSON)
    if not os.path.isfile(marker):
        write_json(marker, {**identity, "study_name": study_name})


def folder_lock(output_dir: str) -> FileLock:
    """D's lock (made with D if need be), held while D's own files are written: commands started at once on
    several machines write each file one at a time (a file written together would be mixed)."""
    os.makedirs(output_dir, exist_ok=True)
    return FileLock(os.path.join(output_dir, LOCK_FILE))
