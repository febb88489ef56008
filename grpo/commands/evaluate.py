"""`grpo eval`: evaluate a saved model (or the configured one) on the held-out prompts of eval.path."""

from __future__ import annotations

from grpo.backend import load_inference_model, load_inference_mtp
from grpo.backend.accelerator import make_accelerator, model_config_for
from grpo.data import load_examples
from grpo.evaluate import Evaluation, evaluate
from grpo.modeling.loading import load_tokenizer
from grpo.rollout import make_engine
from grpo.tools.calls import tool_prompt
from grpo.scoring.scorer import Scorer


def evaluate_checkpoint(cfg, checkpoint: str | None) -> Evaluation:
    """Evaluate the model saved in `checkpoint` (cfg.model when None) on cfg.eval.path."""
    if cfg.eval.path is None:
        raise ValueError("eval.path is not set: name the held-out prompts, e.g. eval.path=data/gsm8k/test.jsonl")
    model_cfg = model_config_for(cfg.model, checkpoint)
    accelerator = make_accelerator(cfg.train)
    tokenizer = load_tokenizer(model_cfg)
    examples, _ = load_examples(cfg.eval.path, cfg.eval.split, cfg.eval.num_prompts, cfg.data, tokenizer,
                                tool_prompt(cfg, tokenizer))
    model = load_inference_model(model_cfg, cfg.train, accelerator.device)
    engine = make_engine(cfg, model, tokenizer, accelerator.autocast,
                         mtp=load_inference_mtp(cfg, model_cfg, model))
    scorer = Scorer(cfg.rewards, cfg.scoring)
    try:
        return evaluate(engine, examples, scorer, cfg.rollout, cfg.eval)
    finally:
        scorer.close()
        engine.close()
