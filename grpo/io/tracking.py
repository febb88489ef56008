"""Where metrics go: the console, output_dir/metrics.jsonl, output_dir/completions.jsonl and wandb.

The loop calls `log(metrics, step)`, `log_completions(...)` and `finish()` and nothing else (and times its phases with `PhaseTimer`); with wandb
disabled the wandb part is simply absent, so the loop never asks whether wandb is on. Non-main processes get
a `NullTracker`.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import time
from collections import defaultdict
from pathlib import Path

CONSOLE_KEYS = [("reward", "reward", "{:.3f}"), ("sft/loss", "sft_loss", "{:.4f}"), ("eval/accuracy", "eval_acc", "{:.3f}"), ("kl", "kl", "{:.4f}"),
                ("completion_length", "len", "{:.1f}"), ("grad_norm", "grad_norm", "{:.3f}"),
                ("step_time", "time", "{:.1f}s")]


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_completions(self, step: int, records: list[dict]) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker:
    def __init__(self, cfg, output_dir: Path, max_steps: int, first_step: int = 1):
        self.cfg, self.max_steps, self.first_step = cfg.logging, max_steps, first_step
        self.started = time.monotonic()
        self.jsonl = open(output_dir / "metrics.jsonl", "a")
        self.completions = open(output_dir / "completions.jsonl", "a")
        self.wandb_run = self.table = None
        mode = resolve_wandb_mode(self.cfg.wandb)
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=self.cfg.project, name=self.cfg.run_name or output_dir.name,
                                        tags=list(self.cfg.tags), config=cfg.to_dict(), dir=str(output_dir), mode=mode)
            self.table = wandb.Table(columns=["step", "prompt", "completion", "reward", "advantage", "rewards"],
                                     log_mode="INCREMENTAL")
            note = " (upload later with `wandb sync`)" if mode == "offline" else ""
            print(f"wandb: {mode} run in {self.wandb_run.dir}{note}")

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if step % self.cfg.log_every == 0 or step == self.max_steps or "eval/accuracy" in metrics:
            print(self._line(metrics, step), flush=True)

    def log_completions(self, step: int, records: list[dict]) -> None:
        """records: one per completion of a group: prompt, completion, reward, advantage, rewards per rule."""
        self.completions.write(json.dumps({"step": step, "prompt": records[0]["prompt"],
                                           "completions": [{k: v for k, v in r.items() if k != "prompt"}
                                                           for r in records]}) + "\n")
        self.completions.flush()
        if self.table is not None:
            for r in records:
                self.table.add_data(step, r["prompt"], r["completion"], r["reward"], r["advantage"],
                                    json.dumps(r["rewards"]))
            self.wandb_run.log({"completions": self.table}, step=step)

    def _line(self, metrics: dict, step: int) -> str:
        parts = [f"{label} {fmt.format(metrics[k])}" for k, label, fmt in CONSOLE_KEYS
                 if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])]
        rules = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in metrics.items()
                 if k.startswith("reward/") and k.count("/") == 1 and isinstance(v, float) and math.isfinite(v)]
        done = step - self.first_step + 1
        eta = _duration((time.monotonic() - self.started) / done * (self.max_steps - step)) if done > 0 else "-"
        bar = "#" * round(10 * step / max(self.max_steps, 1))
        return f"step {step:>4}/{self.max_steps} [{bar:<10}] eta {eta} | " + " | ".join(parts[:1] + rules + parts[1:])

    def finish(self) -> None:
        self.jsonl.close()
        self.completions.close()
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


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` from a metrics or completions JSONL, so a resumed run writes them once."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _jsonable(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


class PhaseTimer:
    """Wall time of each named phase of a step, for time/<phase> metrics."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}
