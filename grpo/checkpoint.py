"""Checkpoints: model and tokenizer in Hugging Face format, plus the training state to continue from.

A checkpoint is written into a temporary folder and renamed into place, so a folder named checkpoint-<step>
is always complete. Model weights are safetensors; the training state is plain tensors and numbers.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch


def save_model(folder: Path, model, tokenizer) -> None:
    """Model (safetensors) and tokenizer, loadable with AutoModelForCausalLM/AutoTokenizer.from_pretrained."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_checkpoint(folder: Path, model, tokenizer, optimizer, scheduler, step: int, data_state: dict,
                    config_yaml: str) -> Path:
    """Write `folder` atomically: model, tokenizer, optimizer, scheduler, RNG states, data position, config."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model, tokenizer)
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data": data_state,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
