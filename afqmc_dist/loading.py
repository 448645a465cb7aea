"""Loading model folders: what is wrong with a folder said in one line, and transformers' load report replaced.

`check_folder` looks at a local folder before transformers does, so that each way a folder can be unusable gets
a message that says what is missing or damaged (no such folder, an empty one, no config.json, no weights, a
weights file cut short or overwritten) instead of whatever the hub client or safetensors makes of it.

`load_weights` calls `from_pretrained` with transformers' own LOAD REPORT table silenced (through its verbosity
setting) and returns what the table would show; `describe_loading` sorts that into what is expected when
fine-tuning a base checkpoint (a new classifier head, an unused pretraining head) and what is not.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from contextlib import contextmanager

from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers.utils import logging as transformers_logging

from .errors import UserError, first_line

try:  # huggingface_hub's strict config dataclasses (transformers >= 5.x validates config values through them)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover - older huggingface_hub
    StrictDataclassError = ValueError

# What a damaged or inconsistent folder makes transformers raise (a wrong value type in config.json is a
# TypeError where the config is not validated, a StrictDataclassError where it is; pickled .bin weights that are
# not a pickle, an UnpicklingError).
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError, StrictDataclassError,
               pickle.UnpicklingError)

POOLER = "pooler"  # inside some encoders (BERT's): absent from some base checkpoints, and unused by --head cls


def reason(error: BaseException, limit: int = 300) -> str:
    """A library error's message on one line: its lines joined (a validation error names the field on its first
    line and says what is wrong on the next), cut at `limit` characters."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _parts(key: str) -> list[str]:
    return key.split(".")


def in_encoder(key: str, encoder: str) -> bool:
    """A weight of the encoder (the part named by the model class's `base_model_prefix`: `bert`, `roberta`,
    `model`, ...). Every other weight of a model belongs to its head."""
    return key.startswith(f"{encoder}.")


def is_rank_zero() -> bool:
    """The process that prints notes (RANK is set by every launcher; a plain run is rank 0)."""
    return os.environ.get("RANK", "0") in ("", "0")


def check_folder(path: str, where: str, hub_allowed: bool) -> bool:
    """Raise UserError (prefixed `where`) if `path` is not a usable model folder; return True if it is one.

    With `hub_allowed`, a path that does not exist but can be a hub name (`bert-base-chinese`,
    `hfl/chinese-roberta-wwm-ext`) returns False: it is for `from_pretrained` to fetch.
    """
    if not os.path.exists(path):
        if hub_allowed:
            try:
                validate_repo_id(path)
                return False
            except HFValidationError:
                pass  # ./models/x, /abs/x, a/b/c: a path, never a hub name
        raise UserError(f"{where}: no such folder")
    if not os.path.isdir(path):
        raise UserError(f"{where}: is a file, not a model folder")
    names = sorted(os.listdir(path))
    if not names:
        raise UserError(f"{where}: the folder is empty (no config.json, no weights)")
    if "config.json" not in names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(f"{where}: no config.json in the folder (it holds {shown}): not a Hugging Face model folder")
    problem = weights_problem(path, names)
    if problem:
        raise UserError(f"{where}: {problem}")
    return True


def weights_problem(path: str, names: list[str]) -> str | None:
    """Why the weights of the folder `path` (holding `names`) cannot be loaded, or None.

    Reads only the safetensors headers (a few KiB): a file overwritten with other bytes has no valid header, and
    one cut short no longer covers the tensors its header lists. Pickled `.bin` weights are left to torch.
    """
    if "model.safetensors" in names:
        files = ["model.safetensors"]
    elif "model.safetensors.index.json" in names:
        try:
            with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"model.safetensors.index.json cannot be read ({first_line(e)})"
    elif "pytorch_model.bin" in names or "pytorch_model.bin.index.json" in names:
        return None
    else:
        return "no weights in the folder (model.safetensors or pytorch_model.bin)"
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        try:
            with safe_open(file, "pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as e:
            return f"{name} is damaged or incomplete ({first_line(e)}; {os.path.getsize(file)} bytes on disk)"
    return None


@contextmanager
def quiet_transformers():
    """Silence transformers through its own verbosity and progress-bar switches. While weights load: the LOAD
    REPORT table it logs (once per process) for every missing or unexpected weight is replaced by
    `describe_loading`'s lines. While best/ is written: its "Writing model shards" bar would appear inside the
    training bar. Either bar is noise in a run's log."""
    level, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
        if bars:
            transformers_logging.enable_progress_bar()


def load_weights(model_cls, path: str, config, **kwargs):
    """`model_cls.from_pretrained(path, **kwargs)` without the load report; returns (model, loading info).

    Mismatched shapes load (re-initialised) instead of raising, so that the caller sees which weights they are;
    callers refuse any (see `describe_loading`).
    """
    with quiet_transformers():
        return model_cls.from_pretrained(path, config=config, output_loading_info=True, ignore_mismatched_sizes=True,
                                         **kwargs)


def _shapes(mismatched) -> str:
    shown = [f"{key} (checkpoint {list(old)}, model {list(new)})" for key, old, new in sorted(mismatched)[:3]]
    return ", ".join(shown) + (f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else "")


def _keys(keys) -> str:
    return "\n".join(f"    {key}" for key in sorted(keys))


def describe_loading(info: dict, where: str, trained: bool, encoder: str,
                     pretraining_heads: tuple[str, ...] = ()) -> str | None:
    """Check what `load_weights` reported; return the one line to print when all is as expected, else raise.

    `encoder` is the model's `base_model_prefix`. Base checkpoint (`trained` False): the classification head (every
    weight outside the encoder) is new, as expected, and so may be the encoder's pooler; the checkpoint's
    pretraining heads (weights named by a prefix in `pretraining_heads`) are not used. Any other missing weight or
    a shape mismatch is a UserError; any other unexpected weight is printed in full (on rank 0) as a warning and the
    run goes on.
    A trained model (`trained` True) must have every weight: a missing classifier means a base checkpoint.
    """
    missing, unexpected, mismatched = info["missing_keys"], info["unexpected_keys"], sorted(info["mismatched_keys"])
    if mismatched:
        if not trained and not any(in_encoder(key, encoder) for key, _, _ in mismatched):
            raise UserError(f"{where} already has a classifier, for another number of labels than the "
                            f"{mismatched[-1][2][0]} of --label_list: start from the base checkpoint")
        raise UserError(f"{where}: {len(mismatched)} weights have other shapes than its config.json says: "
                        f"{_shapes(mismatched)}")
    head = sorted(key for key in missing if not in_encoder(key, encoder))
    if trained and head:
        raise UserError(f"{where}: no trained classification head: {', '.join(head)} not in its weights (a base "
                        "checkpoint, not a model fine-tuned by this tool: train one with --do_train)")
    pooler = [key for key in missing if in_encoder(key, encoder) and POOLER in _parts(key)]
    lost = sorted(key for key in missing if in_encoder(key, encoder) and (trained or key not in pooler))
    if lost:
        what = "weights" if trained else "encoder weights"
        raise UserError(f"{where}: {len(lost)} {what} are not in the checkpoint (e.g. {lost[0]})"
                        + ("" if trained else "; is --model_type right?"))
    surprising = sorted(key for key in unexpected if trained or not (key.startswith(pretraining_heads)
                                                                     or POOLER in _parts(key)))
    if surprising and is_rank_zero():
        print(f"warning: {where}: {len(surprising)} weights of the checkpoint are not used by the model (they do not "
              f"belong to it: is it the right checkpoint?):\n{_keys(surprising)}", file=sys.stderr, flush=True)
    if trained:
        return None
    if not head:
        return "classifier head loaded from the checkpoint (it was already fine-tuned for this number of labels)"
    return f"classifier head{' (and its pooler)' if pooler else ''} initialised from scratch, as expected when " \
           "fine-tuning a base checkpoint"
