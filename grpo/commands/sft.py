"""`grpo sft`: supervised fine-tuning on prompt/response pairs, the cold-start and distillation stage of
DeepSeek-R1's recipe. Same config, data, checkpoint and tracking code as `grpo train`.

The loss is the mean negative log-likelihood over response tokens (and the EOS after them) of the whole
batch; prompt tokens are context only. With model.mtp, lambda (model.mtp.weight) times the MTP module's loss
(the mean over the same batch's response tokens from the third on, grpo.modeling.mtp) is added, as
DeepSeek-V3 trains it; both are logged (sft/loss, sft/mtp_loss). Micro-batches are normalised by the batch's
response-token count, so accumulation gives the gradient of one pass over the batch.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from grpo.io.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from grpo.config import Config, to_yaml
from grpo.data import DataError, PromptSampler, build_examples, load_rows
from grpo.modeling.checkpointing import checkpoint_layers
from grpo.modeling.head import head_logprobs
from grpo.modeling.logprobs import position_ids_from_mask, split_head
from grpo.modeling.loading import load_model, load_tokenizer
from grpo.modeling.mtp import load_mtp, mtp_loss_sum, mtp_target_count, save_mtp, start_mtp
from grpo.backend.accelerator import make_accelerator, make_optimizer, make_scheduler
from grpo.io.tracking import Tracker, truncate_metrics
from grpo.tools.calls import tool_prompt

IGNORE = -100
TOOL_RESULT = re.compile(r"(\n<tool_response>\n.*?\n</tool_response>\n)", re.DOTALL)  # as grpo.tools.calls writes them


def sft_features(prompt: str, response: str, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one example: labels are IGNORE on prompt tokens, the token ids on response
    tokens and on the EOS appended after them. Over-long examples lose the end of the response.

    A response holding tool results in the plain layout (`<tool_response>...</tool_response>` blocks, docs/tools.md)
    is tokenized piece by piece, as a multi-turn rollout builds it (model text, result, model text, ...), and
    the results' labels are IGNORE: they are context, as in GRPO.

    Example (one token per character): prompt "ab", response "c", EOS id 0 -> ids [a, b, c, 0],
    labels [-100, -100, c, 0].
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids, labels = list(prompt_ids), [IGNORE] * len(prompt_ids)
    for k, piece in enumerate(TOOL_RESULT.split(response)):  # odd pieces are tool results
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        ids += piece_ids
        labels += [IGNORE] * len(piece_ids) if k % 2 else piece_ids
    ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return ids[:max_length], labels[:max_length]


def collate(features: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels [n, L]."""
    width = max(len(ids) for ids, _ in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(features):
        ids[i, :len(row_ids)], labels[i, :len(row_labels)], mask[i, :len(row_ids)] = (
            torch.tensor(row_ids), torch.tensor(row_labels), 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(features: list[tuple[list[int], list[int]]], max_length: int) -> list[list[tuple[list[int], list[int]]]]:
    """Group examples, in order, into rows of at most max_length tokens (an example never splits)."""
    rows, row, used = [], [], 0
    for ids, labels in features:
        if row and used + len(ids) > max_length:
            rows.append(row)
            row, used = [], 0
        row.append((ids, labels))
        used += len(ids)
    return rows + ([row] if row else [])


def collate_packed(rows: list[list[tuple[list[int], list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows [n, L]: input_ids, labels (each example's first label ignored: nothing precedes it),
    position_ids restarting at 0 per example, and a 4D boolean attention mask [n, 1, L, L] that lets a token
    see only earlier tokens of its own example."""
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for j, (example_ids, example_labels) in enumerate(row):
            end = start + len(example_ids)
            ids[i, start:end] = torch.tensor(example_ids)
            labels[i, start + 1:end] = torch.tensor(example_labels[1:], dtype=torch.long)
            positions[i, start:end] = torch.arange(end - start)
            segment[i, start:end] = j
            start = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (segment.unsqueeze(2) == segment.unsqueeze(1)) & (segment.unsqueeze(2) >= 0)
    mask = (same & causal).unsqueeze(1)
    mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves, so no row is empty
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def response_nll(model, batch: dict[str, torch.Tensor], num_tokens: float) -> torch.Tensor:
    """Sum of -log p(label) over labelled positions, divided by num_tokens (the whole batch's count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch.get("position_ids")).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=IGNORE, reduction="sum")
    return losses / max(num_tokens, 1.0)


def response_and_mtp_nll(model, mtp, batch: dict[str, torch.Tensor], num_tokens: float,
                         num_mtp_tokens: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(response_nll, the MTP loss sum / num_mtp_tokens) from one decoder pass: the head reads its hidden
    states for the response tokens, the MTP module (grpo.modeling.mtp) for the tokens after next."""
    decoder, weight = split_head(model)
    mask, labels = batch["attention_mask"], batch["labels"]
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask,
                     position_ids=position_ids_from_mask(mask)).last_hidden_state
    targets = labels[:, 1:] != IGNORE
    nll = -head_logprobs(hidden[:, :-1], weight, batch["input_ids"][:, 1:], targets.long()).sum()
    mtp_sum, _ = mtp_loss_sum(mtp, model, hidden, batch["input_ids"], mask, (labels != IGNORE).long())
    return nll / max(num_tokens, 1.0), mtp_sum / max(num_mtp_tokens, 1.0)


def sft(cfg: Config, resume: bool | str = False) -> dict[str, float]:
    """Fine-tune cfg.model on cfg.data (prompt column -> cfg.sft.response_column) for cfg.train.max_steps."""
    out = Path(cfg.train.output_dir)
    checkpoint = (latest_checkpoint(out) if resume is True else Path(resume)) if resume else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    set_seed(cfg.train.seed)
    accelerator = make_accelerator(cfg.train)
    tokenizer = load_tokenizer(cfg.model)
    rows = load_rows(cfg.data.path, cfg.data.split, cfg.data.max_samples)
    missing = [i for i, row in enumerate(rows) if not str(row.get(cfg.sft.response_column) or "").strip()]
    if missing:
        raise DataError(f"{cfg.data.path}: {len(missing)} rows have no {cfg.sft.response_column!r} (first: row "
                        f"{missing[0]}); set sft.response_column to the column with the target responses")
    examples, _ = build_examples(rows, cfg.data, tokenizer, cfg.data.path, tool_prompt(cfg, tokenizer))
    model = load_model(cfg.model, accelerator.device)
    if cfg.train.gradient_checkpointing:
        checkpoint_layers(model, share_prompt=False)  # response_nll runs whole rows, no KV cache
    mtp = None
    if cfg.model.mtp is not None:
        if accelerator.num_processes > 1:
            raise ValueError("model.mtp trains on one process for now; launch one process")
        mtp = start_mtp(cfg.model, model) if checkpoint is None else load_mtp(checkpoint, model)
        if mtp is None:
            raise FileNotFoundError(f"--resume: {checkpoint} has no MTP module (mtp.safetensors); it was written "
                                    "without model.mtp, so resume without it or start a new output_dir")
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": trained}]
    if mtp is not None:
        groups.append({"params": list(mtp.parameters()), "lr": cfg.model.mtp.lr or cfg.optim.lr})
        trained = trained + groups[1]["params"]
    optimizer = make_optimizer(groups, cfg.optim, accelerator.device)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    sampler = PromptSampler(examples, cfg.train.seed, cfg.data.shuffle)
    start = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler)
        sampler.load_state_dict(state["data"])
        start = state["step"]
    truncate_metrics(out / "metrics.jsonl", start)
    tracker = Tracker(cfg, out, cfg.train.max_steps, start + 1)
    metrics: dict[str, float] = {}
    for step in range(start + 1, cfg.train.max_steps + 1):
        started = time.perf_counter()
        batch = sampler.next_batch(cfg.sft.batch_size)
        features = [sft_features(e["prompt"], str(e[cfg.sft.response_column]), tokenizer, cfg.sft.max_length)
                    for e in batch]
        num_tokens = sum(sum(1 for label in labels[1:] if label != IGNORE) for _, labels in features)
        num_mtp_tokens = sum(mtp_target_count(labels, IGNORE) for _, labels in features)
        rows = pack(features, cfg.sft.max_length) if cfg.sft.packing else [[f] for f in features]
        total, total_mtp = 0.0, 0.0
        for i in range(0, len(rows), cfg.train.micro_batch_size):
            chunk = rows[i:i + cfg.train.micro_batch_size]
            micro = collate_packed(chunk, tokenizer.pad_token_id) if cfg.sft.packing else \
                collate([row[0] for row in chunk], tokenizer.pad_token_id)
            micro = {k: v.to(accelerator.device) for k, v in micro.items()}
            with accelerator.autocast():
                if mtp is None:
                    loss = response_nll(model, micro, num_tokens)
                else:
                    loss, mtp_loss = response_and_mtp_nll(model, mtp, micro, num_tokens, num_mtp_tokens)
                    total_mtp += mtp_loss.item()
            accelerator.backward(loss if mtp is None else loss + cfg.model.mtp.weight * mtp_loss)
            total += loss.item()
        grad_norm = accelerator.clip_grad_norm_(trained, cfg.optim.max_grad_norm or float("inf")).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"sft/loss": total, "sft/response_tokens": float(num_tokens), "grad_norm": grad_norm,
                   "lr": scheduler.get_last_lr()[0], "step_time": time.perf_counter() - started,
                   **({} if mtp is None else {"sft/mtp_loss": total_mtp})}
        tracker.log(metrics, step)
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            save_checkpoint(out, step, accelerator.unwrap_model(model), tokenizer, optimizer, scheduler,
                            sampler.state_dict(), to_yaml(cfg), keep_last_n=cfg.train.keep_last_n, mtp=mtp)
    save_model(out / "final", accelerator.unwrap_model(model), tokenizer, merged=True)
    if mtp is not None:
        save_mtp(out / "final", mtp, model.config)
    print(f"final model saved to {out / 'final'}")
    tracker.finish()
    return metrics
