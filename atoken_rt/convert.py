"""Convert an AToken checkpoint to safetensors: ``python -m atoken_rt.convert SRC DST``.

    python -m atoken_rt.convert atoken-sod.pt atoken-sod.bf16.safetensors --dtype bf16 --config atoken-sod
"""

from __future__ import annotations

import argparse

import torch

from .checkpoint import convert_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m atoken_rt.convert",
                                description="Convert an AToken checkpoint to safetensors.")
    p.add_argument("src", help="official .pt (plain state dict) or .safetensors")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--config", default=None, help="preset or YAML path to check keys against")
    a = p.parse_args(argv)
    dt = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    out = convert_checkpoint(a.src, a.dst, dt, a.config)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
