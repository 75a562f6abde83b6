#!/usr/bin/env python3
"""Write a request file (JSONL) of random prompts for tests, demos and benchmarks.

    python tools/make_requests.py --n 16 --vocab 50304 --prompt-len 8:64 --max-new 32 --out req.jsonl

Prompt lengths are uniform in the given range (or fixed: --prompt-len 128); --sampled F makes a fraction
F of the requests use seeded sampling (temperature 0.8, top_p 0.95) instead of greedy.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def make_requests(n: int, vocab: int, prompt_len: tuple[int, int], max_new: tuple[int, int], seed: int = 0,
                  sampled: float = 0.0, first_id: int = 3) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = {
            "id": f"q{i}",
            "input_ids": [rng.randrange(first_id, vocab) for _ in range(rng.randint(*prompt_len))],
            "max_new_tokens": rng.randint(*max_new),
        }
        if rng.random() < sampled:
            r.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 40))
        out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="number of requests")
    p.add_argument("--vocab", type=int, required=True, help="token ids are drawn from [3, vocab)")
    p.add_argument("--prompt-len", type=_range, default=(8, 64), help="LO:HI or N (default 8:64)")
    p.add_argument("--max-new", type=_range, default=(32, 32), help="LO:HI or N new tokens (default 32)")
    p.add_argument("--sampled", type=float, default=0.0, help="fraction of seeded-sampling requests (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")
    p.add_argument("--out", type=Path, required=True, help="file to write")
    a = p.parse_args(argv)
    reqs = make_requests(a.n, a.vocab, a.prompt_len, a.max_new, a.seed, a.sampled)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
