"""`grpo generate`: rejection sampling. Sample k completions per prompt, score them with the configured
reward rules, keep those that pass, and write a dataset: DeepSeek-R1's rejection-sampling stage and the
teacher side of distillation. Same config, data, model and reward code as `grpo train`.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import set_seed

from grpo.config import Config
from grpo.data import load_examples
from grpo.backend import load_inference_model, load_inference_mtp
from grpo.backend.accelerator import make_accelerator, model_config_for
from grpo.modeling.loading import load_tokenizer
from grpo.rollout import Sampling, make_engine
from grpo.tools.calls import tool_prompt
from grpo.scoring.scorer import Scorer


def select_samples(texts: list[str], totals: list[float], keep: str, threshold: float, max_per_prompt: int) -> list[int]:
    """Indices of one prompt's samples that pass, duplicates (same text) and empty texts removed, in
    sampling order.

    threshold: the first max_per_prompt distinct samples with total >= threshold.
    best: the highest-scoring sample (the first of equals) if it reaches threshold.
    all_passing: every distinct sample with total >= threshold.
    Example: totals [1, 0, 1, 1] with texts [a, b, a, c], threshold 1: threshold/1 -> [0];
    threshold/5 -> [0, 3]; best -> [0]; all_passing -> [0, 3].
    """
    seen, passing = set(), []
    for i, (text, total) in enumerate(zip(texts, totals)):
        if total >= threshold and text.strip() and text not in seen:
            seen.add(text)
            passing.append(i)
    if keep == "best":
        return [max(passing, key=lambda i: (totals[i], -i))] if passing else []
    if keep == "all_passing":
        return passing
    return passing[:max_per_prompt]


def generate_dataset(cfg: Config, checkpoint: str | None = None) -> Path:
    """Write train.output_dir/generate.output from cfg.data's prompts; returns its path."""
    g = cfg.generate
    model_cfg = model_config_for(cfg.model, checkpoint)
    set_seed(cfg.train.seed)
    accelerator = make_accelerator(cfg.train)
    tokenizer = load_tokenizer(model_cfg)
    examples, _ = load_examples(cfg.data.path, cfg.data.split, cfg.data.max_samples, cfg.data, tokenizer,
                                tool_prompt(cfg, tokenizer))
    model = load_inference_model(model_cfg, cfg.train, accelerator.device)
    engine = make_engine(cfg, model, tokenizer, accelerator.autocast, mtp=load_inference_mtp(cfg, model_cfg, model))
    out = Path(cfg.train.output_dir) / g.output
    out.parent.mkdir(parents=True, exist_ok=True)
    sampling = {"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p, "top_k": cfg.rollout.top_k,
                "max_completion_length": cfg.rollout.max_completion_length, "num_samples": g.num_samples}
    kept = prompts_with_any = 0
    scorer = Scorer(cfg.rewards, cfg.scoring)
    try:
        with open(out, "w") as f:
            for start in range(0, len(examples), g.prompts_per_batch):
                batch = examples[start:start + g.prompts_per_batch]
                rollouts = engine.generate([e["prompt"] for e in batch], Sampling.from_config(cfg.rollout, g.num_samples))
                group = [e for e in batch for _ in range(g.num_samples)]
                scores = scorer(rollouts.texts, group, rollouts.completion_mask.sum(dim=1).tolist(), training=False)
                for p, example in enumerate(batch):
                    rows = range(p * g.num_samples, (p + 1) * g.num_samples)
                    chosen = select_samples([rollouts.texts[i] for i in rows], [scores.total[i].item() for i in rows],
                                            g.keep, g.threshold, g.max_per_prompt)
                    prompts_with_any += bool(chosen)
                    for j in chosen:
                        i = rows[j]
                        record = {k: v for k, v in example.items() if _jsonable(v)}
                        record.update({"completion": rollouts.texts[i], "reward": scores.total[i].item(),
                                       "rewards": {k: v[i] for k, v in scores.per_rule.items()},
                                       "truncated": bool(rollouts.truncated[i]), "model": model_cfg.name_or_path,
                                       "sampling": sampling})
                        f.write(json.dumps(record) + "\n")
                        kept += 1
    finally:
        scorer.close()
        engine.close()
    print(f"{out}: kept {kept} samples for {prompts_with_any} of {len(examples)} prompts "
          f"({g.num_samples} sampled per prompt, keep={g.keep}, threshold {g.threshold})")
    return out


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
