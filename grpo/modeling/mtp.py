"""DeepSeek-V3's multi-token prediction (MTP) module, added to any decoder-only causal LM this project trains.

One module of depth 1 predicts the token after next. For a sequence x with main-model hidden states h (the
decoder's output after its final norm, what the LM head reads), position i of the MTP sequence is

    u_i = W_proj [enorm(E x_{i+1}) ; hnorm(h_i)]       (the embedding first, as DeepSeek-V3's eh_proj)
    g_i = Block(u_0 .. u_i)                             (one decoder layer, causal over the MTP sequence)
    p_mtp(x_{i+2} | x_0 .. x_{i+1}) = softmax(W_head norm(g_i))

with the embedding E and the head W_head shared with the main model, and positions (for the rotary
embedding) those of the embedded token x_{i+1}. The MTP loss is the mean over target tokens of
-log p_mtp(x_{i+2}) (DeepSeek-V3, eqs. 21-25); training adds lambda times it to the main loss.

Initialisation for a model that has none: the block is a copy of the model's last decoder layer, the three
norms copies of its final norm, and W_proj = [0 | I], so the untrained module reads the hidden state alone.

Owns the module's own weights and their file: `mtp.safetensors` beside the model, keys in DeepSeek-V3's
layout `model.layers.{N}.{enorm,hnorm,eh_proj,shared_head.norm,<block>}` with N = num_hidden_layers, and
`num_nextn_predict_layers: 1` in config.json (a DeepSeek-V3 checkpoint's MTP layer loads the same way).
Not a submodule of the LM, so the LM's weights, its optimizer, its reference copy and the weights pushed to
an inference engine stay the LM's alone; the shared embedding, rotary embedding and head are read from the
LM at every call, so they are always the policy's current ones. Knows nothing of rollouts or rewards.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from grpo.errors import UserError
from grpo.modeling.head import head_logprobs
from grpo.modeling.logprobs import cache_arg, position_ids_from_mask, split_head

MTP_FILE = "mtp.safetensors"
CONFIG_KEY = "num_nextn_predict_layers"  # DeepSeek-V3's config field for the number of MTP modules
SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # DeepSeek-V3 stores the shared weights again


class MTPError(UserError, ValueError):
    """model.mtp cannot be used with this model or checkpoint."""


class MTPModule(torch.nn.Module):
    """One MTP module (depth 1). forward(lm, hidden, next_ids, ...) -> g [n, L, H], normed, ready for the head."""

    def __init__(self, enorm: torch.nn.Module, hnorm: torch.nn.Module, eh_proj: torch.nn.Linear,
                 block: torch.nn.Module, norm: torch.nn.Module):
        super().__init__()
        self.enorm, self.hnorm, self.eh_proj, self.block = enorm, hnorm, eh_proj, block
        self.shared_head = torch.nn.Module()
        self.shared_head.norm = norm

    @classmethod
    def for_model(cls, lm) -> "MTPModule":
        """A fresh module for `lm` (see the module docstring for the initialisation)."""
        decoder = check_supported(lm)
        H = lm.config.hidden_size
        block = _plain_copy(decoder.layers[-1])
        for module in block.modules():  # its own one-layer KV cache: index 0
            if hasattr(module, "layer_idx"):
                module.layer_idx = 0
        eh_proj = torch.nn.Linear(2 * H, H, bias=False, device=lm.device, dtype=lm.dtype)
        with torch.no_grad():
            eh_proj.weight.zero_()
            eh_proj.weight[:, H:].copy_(torch.eye(H, dtype=lm.dtype))
        mtp = cls(copy.deepcopy(decoder.norm), copy.deepcopy(decoder.norm), eh_proj, block,
                  copy.deepcopy(decoder.norm))
        mtp.requires_grad_(True)
        return mtp

    def forward(self, lm, hidden: torch.Tensor, next_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, cache=None, detach_shared: bool = False) -> torch.Tensor:
        """g [n, L, H] for MTP positions pairing hidden [n, L, H] (h_i) with next_ids [n, L] (x_{i+1}).

        attention_mask [n, past + L]: 1 on MTP positions that hold a real pair (the cache's and these);
        position_ids [n, L]: the positions of next_ids. `cache`: a one-layer KV cache that grows by L
        (decoding); None attends within these L positions only. detach_shared: no gradient reaches the LM
        (its hidden states and embedding), so only this module learns."""
        embeds = lm.get_input_embeddings()(next_ids)
        if detach_shared:
            embeds, hidden = embeds.detach(), hidden.detach()
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        sliding = getattr(self.block, "attention_type", None) == "sliding_attention"
        extra = {cache_arg(self.block): cache}
        if "cache_position" in inspect.signature(self.block.forward).parameters:  # transformers 4.x
            extra["cache_position"] = _cache_position(x, cache)
        mask = _causal_mask(create_sliding_window_causal_mask if sliding else create_causal_mask, lm.config, x,
                            attention_mask, position_ids, cache)
        rotary = lm.get_decoder().rotary_emb(x, position_ids=position_ids)
        out = self.block(x, attention_mask=mask, position_ids=position_ids, use_cache=cache is not None,
                         position_embeddings=rotary, **extra)
        return self.shared_head.norm(out[0] if isinstance(out, tuple) else out)


def _plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module` without the CPU kernels a backend installed on its layers (their instance
    forward, packed weights and the group that lists every layer of the model, which would copy the model)."""
    installed = ("forward", "_onednn_cache", "_onednn_group")
    memo = {id(m.__dict__["_onednn_group"]): None for m in module.modules() if "_onednn_group" in m.__dict__}
    out = copy.deepcopy(module, memo)
    for m in out.modules():
        for name in installed:
            m.__dict__.pop(name, None)
    return out


def check_supported(lm):
    """The decoder of `lm`, when an MTP module can be added to it; else an MTPError saying why."""
    name = type(lm).__name__
    if split_head(lm) is None:
        raise MTPError(f"model.mtp: {name}'s logits are not a plain linear head on the last hidden state, which "
                       "the MTP module shares; models that work: Llama (SmolLM2), Qwen2/3, Mistral, Mixtral, "
                       "DeepSeek-V3")
    decoder = lm.get_decoder()
    if not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "norm") or not hasattr(decoder, "layers"):
        raise MTPError(f"model.mtp: {name}'s decoder has no shared rotary embedding, final norm and layer list "
                       "(rotary_emb, norm, layers), which the MTP block is built from")
    return decoder


def mtp_logprobs(mtp: MTPModule, lm, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 target_mask: torch.Tensor, detach_shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_mtp(x_{i+2}) [n, L - 2], the mask of those counted [n, L - 2]) over whole rows.

    hidden [n, L - 1 or L, H]: the LM's hidden states of input_ids [n, L] (left-padded, attention_mask [n, L]);
    target_mask [n, L]: 1 on the tokens to predict (responses, completions). Position i pairs h_i with
    x_{i+1} and predicts x_{i+2}; it counts when x_i, x_{i+1} and x_{i+2} are real and x_{i+2} is a target."""
    pair_mask = attention_mask[:, :-1] * attention_mask[:, 1:]  # [n, L - 1]: h_i and x_{i+1} both real
    positions = position_ids_from_mask(attention_mask)[:, 1:]
    g = mtp(lm, hidden[:, :input_ids.shape[1] - 1], input_ids[:, 1:], pair_mask, positions,
            detach_shared=detach_shared)
    weight = lm.get_output_embeddings().weight
    counted = target_mask[:, 2:] * pair_mask[:, :-1] * attention_mask[:, 2:]
    logprobs = head_logprobs(g[:, :-1], weight.detach() if detach_shared else weight, input_ids[:, 2:], counted)
    return logprobs, counted


def start_mtp(model_cfg, lm) -> MTPModule:
    """model.mtp's module for `lm`: the one saved in the model.name_or_path folder when it holds one (a model
    `grpo sft` trained with model.mtp, a DeepSeek-V3 checkpoint), else a fresh one."""
    return load_mtp(model_cfg.name_or_path, lm) or MTPModule.for_model(lm)


def mtp_loss_sum(mtp: MTPModule, lm, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 target_mask: torch.Tensor, detach_shared: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of -log p_mtp over the counted targets, their count) (`mtp_logprobs`)."""
    logprobs, counted = mtp_logprobs(mtp, lm, hidden, input_ids, attention_mask, target_mask, detach_shared)
    return -(logprobs * counted).sum(), int(counted.sum())


def mtp_target_count(labels: list, ignore: int) -> int:
    """How many MTP targets a row has: its target tokens from the third on (position i predicts x_{i+2})."""
    return sum(1 for label in labels[2:] if label != ignore)


def save_mtp(folder: Path, mtp: MTPModule, lm_config) -> None:
    """Write `mtp` to folder/mtp.safetensors in DeepSeek-V3's key layout and mark config.json (written first,
    by save_pretrained) with num_nextn_predict_layers: 1."""
    folder = Path(folder)
    prefix = f"model.layers.{lm_config.num_hidden_layers}."
    state = {prefix + _deepseek_name(k): v.detach().contiguous().cpu() for k, v in mtp.state_dict().items()}
    save_file(state, folder / MTP_FILE, metadata={"format": "pt"})
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else lm_config.to_dict()
    config[CONFIG_KEY] = 1
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_mtp(folder: str | Path, lm) -> MTPModule | None:
    """The MTP module saved in `folder` for `lm` (mtp.safetensors, or a DeepSeek-V3 checkpoint's MTP layer in
    its model*.safetensors), on lm's device; None when the folder has none or `folder` is no folder (a hub name)."""
    folder = Path(folder).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file() or not json.loads(config_file.read_text()).get(CONFIG_KEY):
        return None
    prefix = f"model.layers.{lm.config.num_hidden_layers}."
    files = [folder / MTP_FILE] if (folder / MTP_FILE).is_file() else sorted(folder.glob("model*.safetensors"))
    state = {}
    for file in files:
        for key, value in load_file(file, device=str(lm.device)).items():
            if key.startswith(prefix) and key[len(prefix):] not in SHARED_COPIES:
                state[_module_name(key[len(prefix):])] = value
    if not state:
        raise MTPError(f"{config_file} says {CONFIG_KEY}, but no {prefix}* weights are in {[f.name for f in files]}")
    mtp = MTPModule.for_model(lm)
    missing, unexpected = mtp.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MTPError(f"{folder}: the MTP weights do not fit {type(lm).__name__}: missing {sorted(missing)[:5]}, "
                       f"unexpected {sorted(unexpected)[:5]}")
    return mtp.to(lm.dtype)


def _cache_position(x: torch.Tensor, cache) -> torch.Tensor:
    past = 0 if cache is None else cache.get_seq_length()
    return torch.arange(past, past + x.shape[1], device=x.device)


def _causal_mask(make_mask, config, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache):
    """transformers' mask for these positions (what the decoder's own forward builds), whichever version's
    argument names it takes (the cache as `cache` or `past_key_values`; 4.x: `input_embeds`, `cache_position`)."""
    params = inspect.signature(make_mask).parameters
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids,
              "inputs_embeds" if "inputs_embeds" in params else "input_embeds": x,
              "cache" if "cache" in params else "past_key_values": cache}
    if "cache_position" in params:
        kwargs["cache_position"] = _cache_position(x, cache)
    return make_mask(**kwargs)


def _deepseek_name(key: str) -> str:
    """This module's parameter name -> its name under model.layers.{N} (the block's own names go at the top)."""
    return key[len("block."):] if key.startswith("block.") else key


def _module_name(key: str) -> str:
    return key if key.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head") else "block." + key
