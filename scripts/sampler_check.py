"""This trainer's sampler against Hugging Face `generate` (TRL's sampler) on the same model and prompts.

Both draw G completions for each of the same training questions at the config's temperature, top-k and top-p:
this trainer's sampler as a run uses it (`grpo.rollout.builtin.generate` with the oneDNN layers, one random
stream per completion) and `model.generate(do_sample=True)`. Each sample is then scored the same way: its
per-token log-prob under softmax(logits / T) from a plain forward pass (averaged per completion), its length,
whether it hit max_completion_length, and the config's `accuracy` and strict `format` rules. If both draw from
the policy, each statistic's means agree within their standard errors (over completions; the G samples of a
question are correlated, so the real error is somewhat larger).

    python scripts/sampler_check.py CONFIG MODEL [overrides ...] [--prompts 256] [--first 300]
    python scripts/sampler_check.py runs/numbers/r1_cpu/rl/stage_config.yaml runs/numbers/r1_trl/trl-7/checkpoint-5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STATISTICS = ("logprob", "length", "truncated", "accuracy", "format")


def teacher_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask, temperature: float) -> torch.Tensor:
    """Mean log softmax(logits / T)[token] over each completion's tokens, from one plain forward pass: [N]."""
    from grpo.modeling.logprobs import completion_logprobs

    with torch.no_grad():
        token = completion_logprobs(model, torch.cat([prompt_ids, completion_ids], 1),
                                    torch.cat([prompt_mask, mask], 1), completion_ids.shape[1], temperature,
                                    fused_head=False)
    return (token * mask).sum(1) / mask.sum(1)


def sample(which: str, model, tokenizer, examples: list[dict], cfg, chunk: int = 16) -> dict[str, list[float]]:
    """which: "grpo" (this trainer's sampler) or "hf" (`generate`); the statistics of every completion."""
    from grpo.backend import onednn
    from grpo.rollout.base import completion_mask
    from grpo.rollout.builtin import generate
    from rewards.format import format_reward
    from rewards.math import accuracy

    r, G = cfg.rollout, cfg.rollout.num_generations
    stats: dict[str, list[float]] = {k: [] for k in STATISTICS}
    torch.manual_seed(0)
    for start in range(0, len(examples), chunk):
        batch = examples[start:start + chunk]
        prompts = [e["prompt"] for e in batch]
        if which == "grpo":
            seeds = [1_000_003 * start + i for i in range(len(prompts) * G)]
            onednn.install(model)  # as a run samples; the scoring below takes the plain layers
            try:
                out = generate(model, tokenizer, prompts, G, r, seeds=seeds)
            finally:
                onednn.uninstall(model)
            ids, mask, prompt_ids, prompt_mask, texts = (out.completion_ids, out.completion_mask, out.prompt_ids,
                                                         out.prompt_mask, out.texts)
        else:
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                generated = model.generate(**enc, do_sample=True, temperature=r.temperature, top_k=r.top_k,
                                           top_p=r.top_p, max_new_tokens=r.max_completion_length,
                                           num_return_sequences=G, pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id)
            ids = generated[:, enc["input_ids"].shape[1]:]
            mask, _ = completion_mask(ids, [tokenizer.eos_token_id])
            prompt_ids = enc["input_ids"].repeat_interleave(G, 0)
            prompt_mask = enc["attention_mask"].repeat_interleave(G, 0)
            texts = tokenizer.batch_decode(ids.masked_fill(mask == 0, tokenizer.pad_token_id),
                                           skip_special_tokens=True)
        lengths = mask.sum(1)
        stats["logprob"] += teacher_logprobs(model, prompt_ids, prompt_mask, ids, mask, r.temperature).tolist()
        stats["length"] += lengths.float().tolist()
        stats["truncated"] += (lengths == r.max_completion_length).float().tolist()
        per_row = [e for e in batch for _ in range(G)]
        stats["accuracy"] += [accuracy(t, e) or 0.0 for t, e in zip(texts, per_row)]
        stats["format"] += [format_reward(t, e, strict=True) for t, e in zip(texts, per_row)]
    return stats


def summary(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean)."""
    x = torch.tensor(values, dtype=torch.float64)
    return x.mean().item(), (x.std() / len(x) ** 0.5).item()


def check(config: str, model_path: str, prompts: int, first: int, overrides: list[str] = ()) -> dict:
    """{statistic: {"grpo": (mean, se), "hf": (mean, se), "z": difference / its standard error}, "seconds": ...}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.config import load_config
    from grpo.data import load_examples

    cfg = load_config(config, [f"model.name_or_path={model_path}", *overrides])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    examples, _ = load_examples(cfg.data.path, cfg.data.split, None, cfg.data, tokenizer, None)
    examples = examples[first:first + prompts]
    result, seconds = {}, {}
    for which in ("grpo", "hf"):
        started = time.perf_counter()
        result[which] = {k: summary(v) for k, v in sample(which, model, tokenizer, examples, cfg).items()}
        seconds[which] = time.perf_counter() - started
    table = {}
    for k in STATISTICS:
        (a, sa), (b, sb) = result["grpo"][k], result["hf"][k]
        table[k] = {"grpo": (a, sa), "hf": (b, sb), "z": (a - b) / max((sa ** 2 + sb ** 2) ** 0.5, 1e-12)}
    return {"statistics": table, "seconds": seconds, "completions": len(examples) * cfg.rollout.num_generations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("model")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--prompts", type=int, default=256, help="training questions, each sampled G times")
    parser.add_argument("--first", type=int, default=300, help="index of the first training question used")
    args = parser.parse_args()
    result = check(args.config, args.model, args.prompts, args.first, args.overrides)
    print(f"{result['completions']} completions per sampler; mean (standard error); z = difference / its error")
    for k, row in result["statistics"].items():
        print(f"{k:10s} this trainer {row['grpo'][0]:8.4f} ({row['grpo'][1]:.4f})   generate {row['hf'][0]:8.4f} "
              f"({row['hf'][1]:.4f})   z {row['z']:+.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
