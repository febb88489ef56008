"""Built-in reward rules: plain functions of one completion's text and its dataset row.

Contract: `rule(completion: str, example: dict, **kwargs) -> float | None`. `example` is the dataset row
with its gold answer under "answer" (whatever `data.answer_column` names), the formatted "prompt", and
"completion_tokens" (the completion's length in tokens). None means "does not apply to this sample": it is
left out of that rule's mean and counts as 0 in the weighted total. A rule may also return
`(value, {"name": number, ...})`: those sub-metrics are logged as reward/<rule>/<name>. `rewards.base.rule`
declares a batched form and canary samples. Rules know nothing of tensors, models or configs; a config names
the built-ins by the keys of `BUILTINS`.
"""

from rewards.code import code_tests
from rewards.format import format_reward, reasoning_steps, tag_count
from rewards.length import cosine_length, repetition_penalty, soft_overlong, target_length
from rewards.math import accuracy, countdown, true_steps

BUILTINS = {
    "accuracy": accuracy,
    "countdown": countdown,
    "true_steps": true_steps,
    "code_tests": code_tests,
    "format": format_reward,
    "tag_count": tag_count,
    "reasoning_steps": reasoning_steps,
    "cosine_length": cosine_length,
    "repetition_penalty": repetition_penalty,
    "soft_overlong": soft_overlong,
    "target_length": target_length,
}
