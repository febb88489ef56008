"""Write the multi-step arithmetic data of configs/pipelines/r1_cpu.yaml (deterministic).

    python scripts/make_r1_traces.py            # -> data/r1_cpu/{sft,train,test}.jsonl

Each question adds three two-digit numbers, "What is 47 + 38 + 19?", worked in two lines. `--minus P` makes each
operation a subtraction with chance P ("What is 47 + 38 - 19?", the result never negative): after the cold start
the built-in model's sampled answers to such questions were right 19% of the time and most groups of samples
scored alike, so GRPO had little to learn from (docs/pipeline.md); the shipped data has none. `--products F`
makes a fraction F of the questions a two-digit number (not a multiple of ten) times a one-digit one, "What is
23 * 7?", worked in three lines (tens, units, their sum); the cold-start model got 2% of those right, so the
shipped data has none either.
sft.jsonl holds cold-start traces in DeepSeek-R1's layout, each tag on its own line (what the strict `format`
rule accepts), one line of working per step:

    <think>
    47 + 38 = 85
    85 + 19 = 104
    </think>
    <answer>
    104
    </answer>

train.jsonl and test.jsonl hold questions and answers only; no question appears in two files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def product(a: int, d: int) -> tuple[str, list[str], int]:
    """(question, working lines, answer) of a two-digit a times a one-digit d: tens and units, then their sum."""
    tens, units = 10 * (a // 10), a % 10
    steps = [f"{tens} * {d} = {tens * d}", f"{units} * {d} = {units * d}", f"{tens * d} + {units * d} = {a * d}"]
    return f"What is {a} * {d}?", steps, a * d


def sum_of_three(rng: random.Random, minus: float = 0.0) -> tuple[str, list[str], int]:
    """(question, working lines, answer) of three random two-digit numbers added, each operation a subtraction
    with probability `minus`."""
    a, b, c = (rng.randint(10, 99) for _ in range(3))
    first_op, second_op = ("-" if rng.random() < minus else "+" for _ in range(2))
    if first_op == "-" and b > a:
        a, b = b, a
    first = a + b if first_op == "+" else a - b
    if second_op == "-" and c > first:
        second_op = "+"
    answer = first + c if second_op == "+" else first - c
    steps = [f"{a} {first_op} {b} = {first}", f"{first} {second_op} {c} = {answer}"]
    return f"What is {a} {first_op} {b} {second_op} {c}?", steps, answer


def trace(steps: list[str], answer: int) -> str:
    """The response a cold-start trace teaches: the working inside <think>, the number inside <answer>."""
    return "<think>\n" + "\n".join(steps) + f"\n</think>\n<answer>\n{answer}\n</answer>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "r1_cpu")
    parser.add_argument("--sft", type=int, default=300, help="cold-start traces")
    parser.add_argument("--train", type=int, default=1000, help="GRPO questions")
    parser.add_argument("--test", type=int, default=200, help="held-out questions")
    parser.add_argument("--minus", type=float, default=0.0, help="chance that an operation is a subtraction")
    parser.add_argument("--products", type=float, default=0.0, help="fraction of products (at most 648 in all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    products = [product(a, d) for a in range(11, 100) if a % 10 for d in range(2, 10)]  # 648 questions
    rng.shuffle(products)
    sums, seen = [], set()
    while len(sums) < args.sft + args.train + args.test:
        row = sum_of_three(rng, args.minus)
        if row[0] not in seen:
            seen.add(row[0])
            sums.append(row)
    splits = {}
    for name, size in (("test", args.test), ("sft", args.sft), ("train", args.train)):
        n_products = min(round(size * args.products), len(products))
        split = products[:n_products] + sums[:size - n_products]
        products, sums = products[n_products:], sums[size - n_products:]
        rng.shuffle(split)
        splits[name] = split
    args.out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        with open(args.out / f"{name}.jsonl", "w") as f:
            for q, steps, answer in split:
                row = {"question": q, "answer": str(answer)}
                if name == "sft":
                    row["response"] = trace(steps, answer)
                f.write(json.dumps(row) + "\n")
        print(f"{args.out / f'{name}.jsonl'}: {len(split)} rows")


if __name__ == "__main__":
    main()
