"""Length-shaping rules. Lengths are in tokens when the scorer knows them (example["completion_tokens"]),
else in whitespace-separated words."""

from __future__ import annotations

import math

from rewards.base import rule
from rewards.math import accuracy


def _length(completion: str, example: dict) -> int:
    return int(example.get("completion_tokens", len(completion.split())))


@rule(correct=("so the answer is 42.", {"answer": "42"}), wrong=("so the answer is 41.", {"answer": "42"}))
def cosine_length(completion: str, example: dict, max_length: int = 1000, min_correct: float = 0.5,
                  max_correct: float = 1.0, min_wrong: float = -1.0, max_wrong: float = -0.5) -> float | None:
    """Correctness reward scaled by length on a cosine (Yeo et al., 2025, "Demystifying Long CoT").

    With c = cos(pi * min(L, max_length) / max_length): a correct answer earns
    min_correct + (max_correct - min_correct) * (1 + c) / 2, from max_correct at L = 0 down to min_correct
    at max_length; a wrong one earns max_wrong + (min_wrong - max_wrong) * (1 + c) / 2, from min_wrong at
    L = 0 up to max_wrong, so short wrong answers cost most. None when the gold answer cannot be parsed.
    """
    correct = accuracy(completion, example)
    if correct is None:
        return None
    c = math.cos(math.pi * min(_length(completion, example), max_length) / max_length)
    low, high = (min_correct, max_correct) if correct else (max_wrong, min_wrong)
    return low + (high - low) * (1 + c) / 2


@rule(correct=("one two three four five six", {}), wrong=("go go go go go go go go", {}))
def repetition_penalty(completion: str, example: dict, ngram: int = 3, max_penalty: float = -1.0) -> float:
    """max_penalty * (1 - distinct n-grams / n-grams) over words: 0 for text without repeats, down to
    max_penalty for text that repeats one n-gram. Texts shorter than n words score 0."""
    words = completion.lower().split()
    grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
    if not grams:
        return 0.0
    return max_penalty * (1 - len(set(grams)) / len(grams))


@rule(correct=("short", {"completion_tokens": 10}), wrong=("long", {"completion_tokens": 100}))
def soft_overlong(completion: str, example: dict, max_length: int = 100, buffer: int = 20,
                  penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to max_length - buffer, then falling linearly to -penalty at
    max_length (and beyond). Set max_length to rollout.max_completion_length."""
    over = _length(completion, example) - (max_length - buffer)
    if over <= 0:
        return 0.0
    return -penalty * min(1.0, over / buffer) if buffer > 0 else -penalty


@rule(correct=("one two three four", {"completion_tokens": 4}), wrong=("one", {"completion_tokens": 1}))
def target_length(completion: str, example: dict, target: int = 4, unit: str = "tokens") -> float:
    """1 - min(1, |L - target| / target): 1.0 at exactly `target`, falling linearly to 0 at 0 or 2 x target.
    L counts tokens (unit="tokens") or characters (unit="chars"). Shapes length alone, so a model of random
    weights earns it too; such a model rarely stops before the token limit, so there use characters, which
    still differ between its completions."""
    if unit not in ("tokens", "chars"):
        raise ValueError(f"target_length: unit must be 'tokens' or 'chars', got {unit!r}")
    length = len(completion) if unit == "chars" else _length(completion, example)
    return 1.0 - min(1.0, abs(length - target) / target)
