"""What a reward rule may declare beyond being a function: a batched form and canary samples."""

from __future__ import annotations

from typing import Callable


def rule(*, batched: bool = False, correct: tuple[str, dict] | None = None,
         wrong: tuple[str, dict] | None = None) -> Callable:
    """Mark a reward rule.

    batched=True: the rule takes lists, `fn(completions, examples, **kwargs) -> list[float | None]`.
    correct / wrong: a (completion, example) pair the rule must score higher / lower; they are scored when a
    run starts, so a rule that silently returns the same value for everything stops the run before training.
    """
    def mark(fn: Callable) -> Callable:
        fn.reward_batched = batched
        fn.reward_canary = (correct, wrong) if correct is not None and wrong is not None else None
        return fn

    return mark
