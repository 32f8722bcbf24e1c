"""torch's CPU attention kernels in training: flash against math, bf16 and fp32, by length.

    python benchmarks/cpu_attention.py

Times causal scaled-dot-product attention forward + backward, one thread, under each kernel
(torch.nn.attention.sdpa_kernel), at shapes [batch, heads, tokens, head width] of the tiny
preset (4 heads of 16) and of OPT-125m (12 heads of 64), as transformers calls it: with a
boolean mask for a padded batch (every PPO batch: prompts are left-padded), `is_causal` for
one without padding; and a no-grad forward with the mask (how PPO scores experience) at the
tiny preset's widths. Medians of 5 timed loops after a warm-up. Backs
tunelab.pipeline.models.MATH_ATTENTION_MAX_TOKENS. Writes reports/bench/cpu_attention.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from checkout import record_header
from token_draw import per_call_us
from torch.nn.attention import SDPBackend, sdpa_kernel

from tunelab.pipeline.models import MATH_ATTENTION_MAX_TOKENS

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4, 4, 16), (16, 4, 16), (4, 12, 64)]  # batch, heads, head width
TOKENS = [16, 32, 64, 128, 192, 256, 384]
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def causal_mask(shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The boolean [batch, 1, tokens, tokens] mask transformers passes for a padded batch."""
    return torch.ones(shape[0], 1, shape[2], shape[2], dtype=torch.bool).tril()


def train_call(shape: tuple[int, int, int, int], dtype: torch.dtype, kernel: SDPBackend,
               masked: bool):  # fmt: skip
    """Forward and backward of one causal attention under `kernel`, by mask or is_causal."""
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    causal = {"attn_mask": causal_mask(shape)} if masked else {"is_causal": True}

    def call() -> None:
        for tensor in (q, k, v):
            tensor.grad = None  # as an optimizer step leaves them: no accumulation
        with sdpa_kernel(kernel):
            out = F.scaled_dot_product_attention(q, k, v, **causal)
        out.float().sum().backward()

    return call


def scoring_call(shape: tuple[int, int, int, int], kernel: SDPBackend):
    """A no-grad bf16 forward with a boolean mask, as transformers passes a padded batch."""
    q, k, v = (torch.randn(*shape, dtype=torch.bfloat16) for _ in range(3))
    mask = causal_mask(shape)

    def call() -> None:
        with torch.no_grad(), sdpa_kernel(kernel):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return call


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for masked, label in ((True, "train, mask"), (False, "train, is_causal")):
        for dtype in (torch.bfloat16, torch.float32):
            for batch, heads, width in SHAPES:
                for tokens in TOKENS:
                    shape = (batch, heads, tokens, width)
                    calls = max(2, 2000 // (tokens * heads))
                    times = {name: per_call_us(train_call(shape, dtype, kernel, masked), calls,
                                               warmup=2) / 1e3
                             for name, kernel in KERNELS.items()}  # fmt: skip
                    rows.append({"pass": label, "dtype": str(dtype).split(".")[1],
                                 "shape": list(shape), **times})  # fmt: skip
                    print(rows[-1], file=sys.stderr)
    for batch, heads, width in SHAPES[:2]:
        for tokens in (18, 64, 128):
            shape = (batch, heads, tokens, width)
            times = {name: per_call_us(scoring_call(shape, kernel), 50, warmup=2) / 1e3
                     for name, kernel in KERNELS.items()}  # fmt: skip
            rows.append({"pass": "no-grad forward, mask", "dtype": "bfloat16",
                         "shape": list(shape), **times})  # fmt: skip
    record = {
        **record_header(),
        "torch": torch.__version__,
        "rows": rows,
    }
    out = ROOT / "reports" / "bench"
    (out / "cpu_attention.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# torch's CPU attention kernels: flash against math", "",
             f"`{record['command']}` on {record['date']} ({record['machine']}, torch "
             f"{record['torch']}), one thread; milliseconds per call, medians of 5 loops. "
             "Causal attention; shape is [batch, heads, tokens, head width].", "",
             "| pass | dtype | shape | flash (ms) | math (ms) | math / flash |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['pass']} | {r['dtype']} | {r['shape']} | {r['flash']:.2f} | "
              f"{r['math']:.2f} | {r['math'] / r['flash']:.2f} |" for r in rows]  # fmt: skip
    lines += ["", f"tunelab trains with the math kernel on the CPU in bf16 up to "
              f"{MATH_ATTENTION_MAX_TOKENS} tokens per row (tunelab.pipeline.models."
              "training_attention), and PPO scores experience with the kernel it trains with.",
              ""]  # fmt: skip
    (out / "cpu_attention.md").write_text("\n".join(lines))
    print((out / "cpu_attention.md").read_text())


if __name__ == "__main__":
    main()
