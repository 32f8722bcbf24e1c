"""One sampled token per row: PPO's draw (tunelab.pipeline.decoding.choose_tokens) against
transformers' (softmax, then torch.multinomial), on the CPU, one thread.

    python benchmarks/token_draw.py [--rows 4] [--vocab 2000]

torch.multinomial draws one exponential number per vocabulary entry; choose_tokens inverts the
cumulative sum with one uniform number per row. Medians of 5 timed loops of 2,000 calls each,
after a warm-up. Writes reports/bench/token_draw.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from checkout import record_header

from tunelab.pipeline.decoding import Decoding, choose_tokens

ROOT = Path(__file__).resolve().parents[1]


def per_call_us(call, calls: int = 2000, warmup: int = 200) -> float:
    """Microseconds per call of `call()`: the median of 5 timed loops after `warmup` calls."""
    for _ in range(warmup):
        call()
    loops = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        loops.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(loops)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab)
    decoding = Decoding(max_new=32, min_new=1, eos_id=2, pad_id=1, temperature=1.0)
    record = {
        **record_header(),
        "rows": args.rows, "vocab": args.vocab,
        "multinomial_us": per_call_us(
            lambda: torch.multinomial(torch.softmax(logits.float(), dim=-1), num_samples=1)),
        "choose_tokens_us": per_call_us(lambda: choose_tokens(logits, 1, decoding)),
    }  # fmt: skip
    out = ROOT / "reports" / "bench"
    (out / "token_draw.json").write_text(json.dumps(record, indent=1) + "\n")
    text = (f"# One sampled token per row\n\n`{record['command'].strip()}` on {record['date']} "
            f"({record['machine']}), {args.rows} rows x {args.vocab} entries, one thread: "
            f"softmax + torch.multinomial {record['multinomial_us']:.0f} us per call, "
            f"choose_tokens {record['choose_tokens_us']:.0f} us.\n")  # fmt: skip
    (out / "token_draw.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
