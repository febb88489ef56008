"""Write the two-digit addition data set used by configs/quickstart.yaml.

Every pair (a, b) with 10 <= a, b <= 99 is one question "What is a + b?" with answer a + b. The pairs are
shuffled with a fixed seed and split so no test question (in either order of a and b) appears in training.

    python scripts/make_arithmetic.py --out data/arithmetic
"""

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/arithmetic")
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pairs = sorted({tuple(sorted((a, b))) for a in range(10, 100) for b in range(10, 100)})
    random.Random(args.seed).shuffle(pairs)
    test, train = pairs[: args.test_size], pairs[args.test_size:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed + 1)
    for name, split in [("train", train), ("test", test)]:
        with open(out / f"{name}.jsonl", "w") as f:
            for a, b in split:
                a, b = (a, b) if rng.random() < 0.5 else (b, a)
                f.write(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
        print(f"{out / name}.jsonl: {len(split)} questions")


if __name__ == "__main__":
    main()
