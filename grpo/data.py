"""Prompts for training and evaluation: rows of a `datasets` split turned into formatted prompt strings.

Owns reading the data (local JSONL/JSON/Parquet/CSV files or a hub name), checking rows, applying the prompt
template (the tokenizer's chat template, DeepSeek-R1-Zero's plain template, or `prompt_format` alone) and the
seeded order in which prompts are drawn. Knows nothing of models or rewards: an example is a dict holding the
row's columns plus `prompt` (the formatted text), `question` and `answer`.
"""

from __future__ import annotations

from pathlib import Path

from grpo.errors import UserError

import torch

# The prompt of DeepSeek-R1-Zero (DeepSeek-R1 paper, table 1); the completion starts inside the think block.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question}. Assistant: <think>"
)
_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(UserError, ValueError):
    """A problem with the data, naming the file, row and column."""


def load_rows(path: str, split: str = "train", max_samples: int | None = None) -> list[dict]:
    """Rows of a local data file or folder, or of a hub dataset, as plain dicts."""
    from datasets import load_dataset

    local = Path(path)
    if local.suffix in _FILE_TYPES:
        if not local.is_file():
            raise DataError(f"data file {path} does not exist (paths are relative to the directory you run from)")
        dataset = load_dataset(_FILE_TYPES[local.suffix], data_files=str(local), split="train")
    else:
        dataset = load_dataset(path, split=split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return [dict(row) for row in dataset]


def format_prompt(row: dict, cfg, tokenizer, tools=None) -> str:
    """The prompt text for one row under `cfg` (a DataConfig). `tools` (grpo.tools.calls.ToolPrompt) lists
    the model's tools: through the chat template (layout `template`), else as instructions in the system
    message (or before the prompt, for the plain and r1_zero templates)."""
    from grpo.tools.calls import plain_system_text

    user = cfg.prompt_format.format_map({**row, "question": row[cfg.prompt_column]})
    instructions = plain_system_text(list(tools.schemas)) if tools is not None and tools.layout == "plain" else None
    if cfg.template in ("r1_zero", "plain"):
        text = R1_ZERO_TEMPLATE.format(question=user) if cfg.template == "r1_zero" else user
        return text if instructions is None else f"{instructions}\n\n{text}"
    system = cfg.system_prompt
    if instructions is not None:
        system = instructions if system is None else f"{system}\n\n{instructions}"
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": user})
    extra = {"tools": list(tools.schemas)} if tools is not None and tools.layout == "template" else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)


def build_examples(rows: list[dict], cfg, tokenizer, source: str, tools=None) -> tuple[list[dict], dict[str, int]]:
    """Checked, formatted examples from `rows` and counts of the rows dropped ("incomplete", "too_long").

    Every row needs a non-empty prompt and answer column; a missing one is an error naming the row, or the
    row is dropped when cfg.drop_incomplete_rows. Prompts longer than cfg.max_prompt_length tokens are an
    error, or dropped when cfg.drop_long_prompts.
    """
    if cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template is 'chat' but the tokenizer has no chat template; "
                        "set data.template to 'plain' or 'r1_zero'")
    bad = [(i, col) for i, row in enumerate(rows) for col in (cfg.prompt_column, cfg.answer_column)
           if row.get(col) is None or str(row.get(col)).strip() == ""]
    if bad and cfg.drop_incomplete_rows:
        bad_rows = {i for i, _ in bad}
        rows = [row for i, row in enumerate(rows) if i not in bad_rows]
    elif bad:
        shown = ", ".join(f"row {i} column {col!r}" for i, col in bad[:5])
        columns = sorted(rows[bad[0][0]].keys())
        raise DataError(f"{source}: {len(bad)} rows lack a value: {shown}{' ...' if len(bad) > 5 else ''}. "
                        f"Columns present: {columns}; set data.prompt_column / data.answer_column or clean the file")
    examples, too_long = [], 0
    prompts = [format_prompt(row, cfg, tokenizer, tools) for row in rows]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    for i, (row, prompt, length) in enumerate(zip(rows, prompts, lengths)):
        if length > cfg.max_prompt_length:
            if not cfg.drop_long_prompts:
                raise DataError(f"{source}: row {i} has a {length}-token prompt, over data.max_prompt_length="
                                f"{cfg.max_prompt_length}; raise it or set data.drop_long_prompts=true")
            too_long += 1
            continue
        examples.append({**row, "prompt": prompt, "question": row[cfg.prompt_column],
                         "answer": str(row[cfg.answer_column])})
    if not examples:
        raise DataError(f"{source}: no usable rows")
    return examples, {"incomplete": len({i for i, _ in bad}) if cfg.drop_incomplete_rows else 0, "too_long": too_long}


def load_examples(path: str, split: str, max_samples: int | None, cfg, tokenizer,
                  tools=None) -> tuple[list[dict], dict]:
    """`build_examples` over the rows of `path` (the first max_samples of them); `tools`: a ToolPrompt."""
    return build_examples(load_rows(path, split, max_samples), cfg, tokenizer, path, tools)


class PromptSampler:
    """Draws prompts in a seeded order, epoch after epoch; its position can be saved and restored."""

    def __init__(self, examples: list[dict], seed: int, shuffle: bool = True):
        self.examples, self.seed, self.shuffle = examples, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next_batch(self, size: int) -> list[dict]:
        batch = []
        while len(batch) < size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            batch.append(self.examples[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()
