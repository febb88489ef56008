"""Do two commits train to the same weights? Bit for bit, on the same config and seed.

Runs each case once with the code of --baseline (a git worktree of that commit) and once with this working
tree, then compares every tensor of final/model.safetensors with torch.equal (no tolerance). Cases:

  quickstart  configs/quickstart.yaml for --steps steps (the built-in SmolLM2-135M-Instruct; 20 eval prompts)
  ddp         two CPU processes (torchrun, gloo) on a tiny random Llama, beta 0.04 (a reference model),
              num_iterations 2 (pi_old captured), 3 steps

    python scripts/parity.py --baseline HEAD~1
    python scripts/parity.py --baseline main --cases ddp

Exits 1 when any case differs. Meant for refactors that must not change what is computed.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="a commit (hash, branch, HEAD~1) to compare against")
    p.add_argument("--cases", nargs="+", default=["quickstart", "ddp"], choices=["quickstart", "ddp"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cache", type=Path, help="keep the baseline's runs here and reuse them (keyed by commit, case "
                                              "and steps), so a second comparison runs only this tree")
    return p.parse_args(argv)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def make_tiny_model(folder: Path) -> None:
    """The tests' tiny Llama and character tokenizer (tests/conftest.py), and a length reward rule beside it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_model

    save_tiny_model(folder)
    (folder.parent / "rules.py").write_text("def length_reward(completion, example):\n    return len(completion) / 10\n")


def command(case: str, out: Path, work: Path, steps: int) -> list[str]:
    common = [f"train.output_dir={out}", f"train.max_steps={steps}", "logging.wandb=disabled"]
    if case == "quickstart":
        return [sys.executable, "-m", "grpo", "train", "configs/quickstart.yaml", "eval.num_prompts=20", *common]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
            "-m", "grpo", "train", "configs/quickstart.yaml", f"model.name_or_path={work / 'tiny'}",
            "data.path=data/arithmetic/train.jsonl", "data.max_samples=64", "eval.path=null",
            f"rewards=[{{fn: '{work / 'rules.py'}:length_reward'}}]", "rollout.num_generations=4",
            "rollout.max_completion_length=8", "train.prompts_per_step=4", "train.micro_batch_size=4",
            "optim.lr=1e-2", "train.mixed_precision=fp32", "scoring.workers=0", "algorithm.beta=0.04",
            "algorithm.num_iterations=2", *common]


def run(cmd: list[str], code: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {code}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return time.perf_counter() - start


def compare(a: Path, b: Path) -> tuple[int, int, list[str]]:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "final/model.safetensors"), load_file(b / "final/model.safetensors")
    if sorted(x) != sorted(y):
        return 0, len(x), ["tensor names differ"]
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    return len(x) - len(differ), len(x), differ


def main(argv=None) -> int:
    args = parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="grpo-parity-") as tmp:
        work = Path(tmp)
        baseline = work / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            if "ddp" in args.cases:
                make_tiny_model(work / "tiny")
            failed = False
            for case in args.cases:
                outs = {}
                for label, code in (("baseline", baseline), ("this tree", ROOT)):
                    outs[label] = work / f"{case}-{label.replace(' ', '-')}"
                    if label == "baseline" and args.cache:
                        outs[label] = args.cache / f"{commit}-{case}-{args.steps}"
                        if (outs[label] / "final/model.safetensors").is_file():
                            print(f"{case}: baseline ({commit}) from {outs[label]}", flush=True)
                            continue
                    seconds = run(command(case, outs[label], work, args.steps), code)
                    print(f"{case}: {label} ({commit if label == 'baseline' else 'working tree'}) ran in {seconds:.0f} s",
                          flush=True)
                same, total, differ = compare(outs["baseline"], outs["this tree"])
                failed |= bool(differ)
                print(f"{case}: {same}/{total} tensors of final/model.safetensors bit-identical"
                      + (f"; differ: {', '.join(differ[:5])}" if differ else ""), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
