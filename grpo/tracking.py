"""Where metrics go: the console, output_dir/metrics.jsonl and wandb.

The loop calls `log(metrics, step)` and `finish()` and nothing else; with wandb disabled the wandb part
is simply absent, so the loop never asks whether wandb is on. Non-main processes get a `NullTracker`.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path

CONSOLE_KEYS = [("reward", "reward", "{:.3f}"), ("eval/accuracy", "eval_acc", "{:.3f}"), ("kl", "kl", "{:.4f}"),
                ("completion_length", "len", "{:.1f}"), ("grad_norm", "grad_norm", "{:.3f}"), ("step_time", "time", "{:.1f}s")]


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker:
    def __init__(self, cfg, output_dir: Path, max_steps: int):
        self.cfg, self.max_steps = cfg.logging, max_steps
        self.jsonl = open(output_dir / "metrics.jsonl", "a")
        self.wandb_run = None
        mode = resolve_wandb_mode(self.cfg.wandb)
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=self.cfg.project, name=self.cfg.run_name or output_dir.name,
                                        tags=list(self.cfg.tags), config=cfg.to_dict(), dir=str(output_dir), mode=mode)
            print(f"wandb: {mode} run in {self.wandb_run.dir}" + (" (upload later with `wandb sync`)" if mode == "offline" else ""))

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if step % self.cfg.log_every == 0 or step == self.max_steps or "eval/accuracy" in metrics:
            parts = [f"{label} {fmt.format(metrics[k])}" for k, label, fmt in CONSOLE_KEYS if k in metrics]
            rules = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in metrics.items()
                     if k.startswith("reward/") and not k.endswith("/errors")]
            print(f"step {step:>4}/{self.max_steps} | " + " | ".join(parts[:1] + rules + parts[1:]), flush=True)

    def finish(self) -> None:
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def resolve_wandb_mode(mode: str) -> str:
    """`auto` becomes online when an API key is configured (WANDB_API_KEY or ~/.netrc), offline otherwise."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def _jsonable(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` from a metrics.jsonl, so a resumed run rewrites them once."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
