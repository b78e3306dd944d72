"""Write the toy task's dataset (examples/toy/toy_task.py) as JSONL: columns `prompt` and `answer`.

    python examples/toy/make_toy_data.py outputs/toy_data.jsonl            # 1,000 examples, seed 0
    python examples/toy/make_toy_data.py data.jsonl --num 200 --seed 3

Deterministic: the same --num and --seed always write the same bytes. Loaded by the trainer
with `datasets.load_dataset("json", data_files=...)` like any local dataset.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as `python examples/toy/make_toy_data.py` from a checkout never installed
    sys.path.insert(0, str(REPO))

from examples.toy.toy_task import make_examples, write_jsonl  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write `--num` examples of seed `--seed` to OUT as JSONL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSONL file to write")
    parser.add_argument("--num", type=int, default=1000, help="number of examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the examples")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    path = write_jsonl(args.out, make_examples(args.num, args.seed))
    print(f"wrote {args.num} toy examples (seed {args.seed}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
