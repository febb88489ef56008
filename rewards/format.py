"""Output-format rules for DeepSeek-R1's `<think>...</think><answer>...</answer>` layout."""

from __future__ import annotations

import re

from rewards.base import rule

_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"  # any text without a think or answer tag in it
_STRICT = re.compile(rf"^\s*<think>\n{_NO_TAG}\n</think>\n<answer>\n{_NO_TAG}\n</answer>\s*$", re.DOTALL)
_LENIENT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_STEP = re.compile(r"(Step \d+[:.]|^\d+\.\s|\n\d+\.\s|^\s*[-*]\s|\n\s*[-*]\s|\bFirst,|\bSecond,|\bNext,|\bFinally,)")


@rule(correct=("<think>\nadd\n</think>\n<answer>\n5\n</answer>", {}), wrong=("5", {}))
def format_reward(completion: str, example: dict, strict: bool = False) -> float:
    """1.0 when the completion has a think block followed by an answer block, else 0.0.

    strict=True also requires each tag on its own line, exactly one think block and one answer block with no
    tag inside either, and nothing before <think> or after </answer> ("...</answer>\n</answer>" earns 0).
    Completions of an R1-Zero prompt start inside the think block (the prompt ends with "<think>"),
    so an opening tag missing from the completion is read from the prompt when example["prompt"] ends with it.
    """
    if str(example.get("prompt", "")).rstrip().endswith("<think>") and "<think>" not in completion:
        completion = "<think>" + ("\n" if strict else "") + completion
    pattern = _STRICT if strict else _LENIENT
    return 1.0 if pattern.search(completion) else 0.0


@rule(correct=("<think>a</think><answer>1</answer>", {}), wrong=("1", {}))
def tag_count(completion: str, example: dict) -> float:
    """Partial credit: 0.25 for each of <think>, </think>, <answer>, </answer> that appears exactly once."""
    return sum(0.25 for tag in _TAGS if completion.count(tag) == 1)


@rule(correct=("Step 1: add. Step 2: carry. Step 3: done.", {}), wrong=("5", {}))
def reasoning_steps(completion: str, example: dict, target: int = 3) -> float:
    """min(1, steps / target), counting step markers: "Step 1:", numbered or bulleted lines, "First," ...

    Rewards laying reasoning out in steps; target is the number of steps that earns the full 1.0.
    """
    return min(1.0, len(_STEP.findall(completion)) / target)
