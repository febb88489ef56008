"""What a reward rule may declare beyond being a function: a batched form and canary samples."""

from __future__ import annotations

from typing import Callable


def rule(*, batched: bool = False, correct: tuple[str, dict] | None = None,
         wrong: tuple[str, dict] | list[tuple[str, dict]] | None = None) -> Callable:
    """Mark a reward rule.

    batched=True: the rule takes lists, `fn(completions, examples, **kwargs) -> list[float | None]`.
    correct / wrong: a (completion, example) pair the rule must score higher, and one pair or a list of pairs
    it must score lower; they are scored when a run starts, so a rule that silently returns the same value for
    everything, or pays for a known hack (a list of wrong samples can name several), stops the run before
    training.
    """
    def mark(fn: Callable) -> Callable:
        fn.reward_batched = batched
        wrongs = [wrong] if isinstance(wrong, tuple) else list(wrong or [])
        fn.reward_canary = (correct, wrongs) if correct is not None and wrongs else None
        return fn

    return mark
