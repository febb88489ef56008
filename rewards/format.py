"""Output-format rules for DeepSeek-R1's `<think>...</think><answer>...</answer>` layout."""

from __future__ import annotations

import re

_STRICT = re.compile(r"^\s*<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\s*$", re.DOTALL)
_LENIENT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion: str, example: dict, strict: bool = False) -> float:
    """1.0 when the completion has a think block followed by an answer block, else 0.0.

    strict=True also requires each tag on its own line and nothing before <think> or after </answer>.
    Completions of an R1-Zero prompt start inside the think block (the prompt ends with "<think>"),
    so an opening tag missing from the completion is read from the prompt when example["prompt"] ends with it.
    """
    if str(example.get("prompt", "")).rstrip().endswith("<think>") and "<think>" not in completion:
        completion = "<think>" + ("\n" if strict else "") + completion
    pattern = _STRICT if strict else _LENIENT
    return 1.0 if pattern.search(completion) else 0.0


def tag_count(completion: str, example: dict) -> float:
    """Partial credit: 0.25 for each of <think>, </think>, <answer>, </answer> that appears exactly once."""
    return sum(0.25 for tag in _TAGS if completion.count(tag) == 1)
