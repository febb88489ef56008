"""Answer-correctness rules checked with math-verify."""

from __future__ import annotations

import re

from math_verify import parse, verify

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def gold_text(answer: str) -> str:
    """The final answer of a gold solution: the part after GSM8K's `####` marker, else the whole text."""
    return answer.split("####")[-1].strip().replace(",", "")


def answer_region(completion: str) -> str:
    """Where the model's final answer is: inside the last <answer>...</answer>, else the whole completion."""
    tagged = _ANSWER_TAG.findall(completion)
    return tagged[-1] if tagged else completion


def accuracy(completion: str, example: dict) -> float | None:
    """1.0 when the completion's final answer equals the gold answer (math-verify), else 0.0.

    The answer is read from the last <answer> tag if there is one, else from the completion, where
    math-verify takes the last number or \\boxed{} expression. Gold answers may be GSM8K-style (`... #### 18`).
    Returns None when the gold answer itself cannot be parsed: the row cannot be scored.
    """
    gold = parse(gold_text(str(example["answer"])))
    if not gold:
        return None
    predicted = parse(answer_region(completion).replace(",", ""))
    return 1.0 if predicted and verify(gold, predicted) else 0.0
