"""Checkpoints: the model in Hugging Face format, plus everything needed to continue the run exactly.

A checkpoint folder holds model.safetensors (+ config and tokenizer, loadable with from_pretrained; a LoRA
run's holds its adapters instead, grpo.modeling.lora),
trainer_state.pt (step, optimizer, scheduler, data position, RNG states of python, numpy and torch) and the
resolved config.yaml; with a resettable reference model, reference.safetensors too. It is written into
`<name>.tmp` and renamed, so a folder named checkpoint-<step> is always complete; the `latest` file in the
output folder is replaced after the rename, and old checkpoints are pruned only after that. Loading uses
safetensors and torch.load(weights_only=True) only: nothing is unpickled.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from grpo.modeling import lora
from grpo.modeling.mtp import save_mtp

LATEST = "latest"


def save_model(folder: Path, model, tokenizer, state_dict: dict | None = None, merged: bool = False) -> None:
    """Model (safetensors) and tokenizer, loadable with AutoModelForCausalLM/AutoTokenizer.from_pretrained.
    `state_dict`: the full weights, when `model` holds only a shard of them (FSDP).

    A model with LoRA adapters is saved as its adapters (peft's layout: adapter_config.json,
    adapter_model.safetensors); merged=True adds `merged/`, the model with the adapters folded into its
    weights, which loads without peft."""
    if lora.has_adapters(model):
        lora.save_adapter(Path(folder), model, state_dict)
        tokenizer.save_pretrained(folder)
        if merged:
            save_plain_model(Path(folder) / "merged", model, tokenizer, lora.merged_state_dict(model, state_dict))
        return
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def save_plain_model(folder: Path, model, tokenizer, state: dict) -> None:
    """`state` (named as `model`'s architecture names its weights) as a Hugging Face model folder, written by
    this process whatever its rank (save_pretrained writes on rank 0 only once torch.distributed is up)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = without_tied_copies(model, state)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def without_tied_copies(model, state: dict) -> dict:
    """`state` without the entries that are copies of tied weights (lm_head.weight when it is the input
    embedding), as save_pretrained writes a model."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {k: v for k, v in state.items() if k not in tied}


def rng_state() -> dict:
    """RNG states of python, numpy, torch's CPU generator and every CUDA device's, as plain types and tensors
    (loadable with weights_only=True)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(state), gauss], "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda", [])  # absent in checkpoints written before CUDA states were saved
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, optimizer, scheduler, data_state: dict,
                    config_yaml: str, reference=None, keep_last_n: int = 0, extra: dict | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None,
                    move_in: dict[str, Path] | None = None, mtp=None) -> Path:
    """Write output_dir/checkpoint-<step> atomically, then point `latest` at it, then prune old ones.
    model_state / optimizer_state: full states gathered from sharded processes, used instead of
    model.state_dict() / optimizer.state_dict(). move_in: {name: folder} moved into the checkpoint before
    it is complete (an engine's own state files). mtp: the model's MTP module, saved beside it."""
    output_dir = Path(output_dir)
    folder = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model, tokenizer, model_state)
    if mtp is not None:
        save_mtp(tmp, mtp, model.config)
    if reference is not None:
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp / "reference.safetensors")
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "data": data_state, "rng": rng_state(), "extra": extra or {}}, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    for name, source in (move_in or {}).items():
        Path(source).rename(tmp / name)
    _fsync_tree(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    _write_atomically(output_dir / LATEST, folder.name + "\n")
    if keep_last_n > 0:
        for old in sorted(_complete_checkpoints(output_dir), key=_step_of)[:-keep_last_n]:
            shutil.rmtree(old)
    return folder


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint that `latest` names, or None when the run has none."""
    pointer = Path(output_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(output_dir) / pointer.read_text().strip()
    if not (folder / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is missing or incomplete; "
                                f"pass --resume {Path(output_dir)}/checkpoint-<step> to pick another")
    return folder


def load_checkpoint(folder: Path, model, optimizer, scheduler, reference=None, load_model=None,
                    load_optimizer=None) -> dict:
    """Restore model, optimizer, scheduler, reference and RNG states in place; returns the trainer state
    (step, data position, extra). load_model(weights) / load_optimizer(state) replace model.load_state_dict /
    optimizer.load_state_dict (sharded models take full states through them)."""
    folder = Path(folder)
    device = "cpu" if load_model else str(next(model.parameters()).device)
    if lora.is_adapter_folder(folder):  # a LoRA run's checkpoint: the adapters, the base as configured
        source = folder / lora.ADAPTER_WEIGHTS
        weights = lora.model_keys(load_file(source, device=device))
        expected = {k for k in model.state_dict() if "lora_" in k}
    else:
        source = folder / "model.safetensors"
        weights = load_file(source, device=device)
        expected = set(model.state_dict())
    missing, unexpected = expected - set(weights), sorted(set(weights) - expected)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or missing - tied:
        raise ValueError(f"{source} does not fit the configured model (model.lora included): missing "
                         f"{sorted(missing - tied)[:5]}, unexpected {unexpected[:5]}")
    (load_model or (lambda w: model.load_state_dict(w, strict=False)))(weights)
    if reference is not None and (folder / "reference.safetensors").is_file():
        reference.load_state_dict(load_file(folder / "reference.safetensors"))
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    (load_optimizer or optimizer.load_state_dict)(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    return [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp")
            and p.name.split("-")[-1].isdigit()]


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
