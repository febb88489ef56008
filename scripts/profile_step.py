"""Where a training step's time goes: `grpo train CONFIG [overrides]` with its phases profiled.

Each phase of every step after the first (--skip) runs between two device synchronisations, so its wall time is
its own. For each phase (rollout, reference, update) this prints that wall time per step, the Python functions
with the most cumulative time (cProfile, over all profiled steps) and, with --ops, the torch operators with the
most self time on the CPU and on the GPU (torch.profiler, over one step). Profiling slows what it measures:
compare phases with each other, and take timings from scripts/bench.py.

    python scripts/profile_step.py configs/quickstart.yaml train.max_steps=3 --ops
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpo.trainer  # noqa: E402
from grpo.config import load_config  # noqa: E402

PHASES = {"rollout": "collect", "reference": "make_batch", "update": "update"}  # phase: grpo.trainer's function


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--skip", type=int, default=1, help="steps run before profiling starts (warm-up)")
    parser.add_argument("--rows", type=int, default=20, help="lines of each table")
    parser.add_argument("--ops", action="store_true", help="also torch.profiler's operator tables (one step)")
    args = parser.parse_args()

    profiles = {phase: cProfile.Profile() for phase in PHASES}
    seconds, calls, operators = defaultdict(list), defaultdict(int), {}

    def profiled(phase: str, function):
        def run(*a, **k):
            calls[phase] += 1
            if calls[phase] <= args.skip:
                return function(*a, **k)
            want_ops = args.ops and phase not in operators
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            ops = torch.profiler.profile(activities=activities) if want_ops else contextlib.nullcontext()
            synchronize()
            started = time.perf_counter()
            with ops:
                profiles[phase].enable()
                out = function(*a, **k)
                synchronize()
                profiles[phase].disable()
            seconds[phase].append(time.perf_counter() - started)
            if want_ops:
                operators[phase] = ops.key_averages()
            return out
        return run

    for phase, name in PHASES.items():
        setattr(grpo.trainer, name, profiled(phase, getattr(grpo.trainer, name)))
    grpo.trainer.train(load_config(args.config, args.overrides))

    for phase in PHASES:
        if not seconds[phase]:
            continue
        print(f"\n=== {phase}: " + ", ".join(f"{s:.3f}" for s in seconds[phase]) + " s per step (profiled)")
        stats = pstats.Stats(profiles[phase])
        stats.sort_stats("cumulative").print_stats(args.rows)
        if phase in operators:
            print(operators[phase].table(sort_by="self_cpu_time_total", row_limit=args.rows))
            if torch.cuda.is_available():
                print(operators[phase].table(sort_by="self_device_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
