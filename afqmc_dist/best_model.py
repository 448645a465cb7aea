"""OUTPUT_DIR/best: the best model so far, written whole in fp32 whatever the engine, and loaded back for testing
and predicting."""

from __future__ import annotations

import os

import torch

from .distributed import first_error
from .errors import UserError
from .evaluation import prepare_for_inference
from .files import WRITE_ERRORS, remove_quietly, replace_dir, write_error
from .loading import quiet_transformers
from .model import check_model_fits, load_trained_model
from .outputs import BEST_DIR
from .run_folder import SetAside, find_best_dir


def save_best_model(accelerator, model, tokenizer, output_dir: str) -> str:
    """Write the prepared `model` and `tokenizer` to OUTPUT_DIR/best. Call on EVERY rank.

    The state dict is taken through `accelerator.get_state_dict`, a collective that gathers a model sharded by
    FSDP/DeepSpeed, so the saved folder is whole and loads into a plain single-process model; floating-point
    weights are saved in fp32 whatever the engine computes in. Only the main process writes, into `best.tmp`,
    renamed over `best` once complete; on a failed write (a full disk) `best.tmp` is removed, `best/` stays as it
    was, and every rank raises the same UserError. Once the new best/ is in place, a run set aside by
    --overwrite_output_dir is removed (run_folder.SetAside).
    """
    final = os.path.join(output_dir, BEST_DIR)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    error = None
    if accelerator.is_main_process:
        state_dict = {k: v.float() if torch.is_floating_point(v) else v for k, v in state_dict.items()}
        tmp = f"{final}.tmp"
        try:
            remove_quietly(tmp)
            with quiet_transformers():
                accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict,
                                                                save_function=accelerator.save)
                tokenizer.save_pretrained(tmp)
            replace_dir(tmp, final)
        except WRITE_ERRORS as e:
            error = write_error(tmp, e)
        finally:
            remove_quietly(tmp)
        if error is None:
            SetAside(output_dir).discard()
    error = first_error(accelerator, error)
    if error:
        raise UserError(f"cannot save the best model: {error}; {final} is as it was")
    accelerator.wait_for_everyone()
    return final


def load_best_model(cfg, accelerator):
    """OUTPUT_DIR/best, whole on this process's device, ready for inference, and its tokenizer. Every rank.
    UserError if there is none, or if it was trained with other labels than --label_list."""
    best_dir = find_best_dir(cfg.output_dir)
    model, tokenizer = load_trained_model(best_dir)
    id2label = model.config.id2label
    trained_labels = [id2label[i] for i in sorted(id2label)]
    if trained_labels != list(cfg.label_list):
        raise UserError(f"{best_dir} was trained with labels {trained_labels}, but --label_list is {cfg.label_list}")
    check_model_fits(model, tokenizer, cfg.max_seq_length, best_dir)
    return prepare_for_inference(accelerator, model), tokenizer
