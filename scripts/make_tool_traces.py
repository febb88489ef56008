"""Write the multiplication-with-a-calculator data of configs/pipelines/tools_multiply.yaml (deterministic).

    python scripts/make_tool_traces.py            # -> data/tools_multiply/{sft,train,test}.jsonl

Questions multiply a 3-digit number by a 2-digit one ("What is 347 * 28?"), which SmolLM2-135M-Instruct cannot do
in its head. sft.jsonl holds cold-start traces in the plain tool layout (docs/tools.md): a calculator call, its
result, and "The answer is N." (the result block is context: `grpo sft` leaves it out of the loss). train.jsonl
and test.jsonl hold questions and answers only; no question appears in two files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trace(a: int, b: int) -> str:
    """The response a trace teaches: call, result (as grpo.tools.calls writes it in the plain layout), answer."""
    call = json.dumps({"name": "calculator", "arguments": {"expression": f"{a} * {b}"}})
    return f"<tool_call>{call}</tool_call>\n<tool_response>\n{a * b}\n</tool_response>\nThe answer is {a * b}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "tools_multiply")
    parser.add_argument("--sft", type=int, default=300, help="cold-start traces")
    parser.add_argument("--train", type=int, default=2000, help="GRPO questions")
    parser.add_argument("--test", type=int, default=200, help="held-out questions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pairs, seen = [], set()
    while len(pairs) < args.sft + args.train + args.test:
        pair = (rng.randint(100, 999), rng.randint(10, 99))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {"sft": pairs[:args.sft], "train": pairs[args.sft:args.sft + args.train],
              "test": pairs[args.sft + args.train:]}
    for name, rows in splits.items():
        with open(args.out / f"{name}.jsonl", "w") as f:
            for a, b in rows:
                row = {"question": f"What is {a} * {b}?", "answer": str(a * b)}
                if name == "sft":
                    row["response"] = trace(a, b)
                f.write(json.dumps(row) + "\n")
        print(f"{args.out / f'{name}.jsonl'}: {len(rows)} rows")


if __name__ == "__main__":
    main()
