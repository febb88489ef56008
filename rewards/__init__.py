"""Built-in reward rules: plain functions of one completion's text and its dataset row.

Contract: `rule(completion: str, example: dict, **kwargs) -> float | None`. `example` is the dataset row
with its gold answer under "answer" (whatever `data.answer_column` names). None means "does not apply to
this sample": it is left out of that rule's mean and counts as 0 in the weighted total. Rules know nothing
of tensors, models or configs. A config names them by the keys of `BUILTINS`.
"""

from rewards.format import format_reward, tag_count
from rewards.math import accuracy

BUILTINS = {
    "accuracy": accuracy,
    "format": format_reward,
    "tag_count": tag_count,
}
