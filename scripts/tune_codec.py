"""Time the fused codec's kernels under tuning variants on the activations of a real model (CUDA).

    python scripts/tune_codec.py OUT.json [--dtype bf16] [--channels-last] [--shapes 128x64x56x56 ...]
        [--variant NAME KEY=VALUE ... (repeatable)]

Each variant is a set of ``division.triton_codec.TUNING`` overrides; every shape is encoded and
decoded under every variant (``division.bench.measure``: back-to-back calls between CUDA events,
inputs cycled past the L2 cache), and the table reports milliseconds per call and the geometric
mean over the shapes. The defaults are ResNet-50's most frequent bf16 channels_last activations at
batch 128. Plans are re-made for each variant (the codec caches plans per tuning).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from division import triton_codec  # noqa: E402
from division.bench import DTYPES, Timer, make_input, measure  # noqa: E402

RESNET50_SHAPES = ["128x64x56x56", "128x128x28x28", "128x256x14x14", "128x512x28x28", "128x1024x14x14"]

VARIANTS = {
    "default": {},
    "enc_mode1": {"encode_mode": 1},
    "enc_w2": {"enc_warps": 2},
    "enc_tile2k_w2": {"max_tile": 2048, "enc_warps": 2},
    "enc_g64_tile4k_w4": {"g": 64, "max_tile": 4096, "enc_warps": 4},
    "dec_4d": {"decode_row": False},
    "dec_tile4k_w4": {"max_tile": 4096, "dec_warps": 4},
}


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--contiguous", action="store_true", help="NCHW inputs (default: channels_last)")
    p.add_argument("--shapes", nargs="+", default=RESNET50_SHAPES)
    p.add_argument("--variant", nargs="+", action="append", default=None, metavar="NAME KEY=VALUE",
                   help="replace the built-in variants (repeat for several)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    variants = VARIANTS if args.variant is None else \
        {v[0]: {k: parse_value(x) for k, x in (kv.split("=", 1) for kv in v[1:])} for v in args.variant}
    device = torch.device("cuda")
    timer = Timer(device)
    codec = triton_codec.TritonDivisionCodec()
    base = dict(triton_codec.TUNING)
    results = []
    shapes = [tuple(int(s) for s in text.split("x")) for text in args.shapes]
    for name, overrides in variants.items():
        triton_codec.TUNING.clear()
        triton_codec.TUNING.update(base, **overrides)
        row = {"variant": name, "tuning": overrides, "shapes": {}}
        try:
            for shape in shapes:
                x = make_input(shape, DTYPES[args.dtype], not args.contiguous, device)
                m = measure(codec, x, timer, args.reps)
                row["shapes"]["x".join(map(str, shape))] = {"compress_ms": m["compress_s"] * 1e3,
                                                            "decompress_ms": m["decompress_s"] * 1e3}
                del x
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            triton_codec.TUNING.clear()
            triton_codec.TUNING.update(base)
        times = row["shapes"].values()
        if times and "error" not in row:
            row["compress_geomean_ms"] = math.exp(sum(math.log(t["compress_ms"]) for t in times) / len(times))
            row["decompress_geomean_ms"] = math.exp(sum(math.log(t["decompress_ms"]) for t in times) / len(times))
        results.append(row)
        cells = " ".join(f"{t['compress_ms']:.3f}/{t['decompress_ms']:.3f}" for t in times)
        print(f"{name:>18}: geomean {row.get('compress_geomean_ms', float('nan')):.3f} / "
              f"{row.get('decompress_geomean_ms', float('nan')):.3f} ms  [{cells}] {row.get('error', '')}", flush=True)
        args.out.write_text(json.dumps({"dtype": args.dtype, "channels_last": not args.contiguous,
                                        "shapes": args.shapes, "results": results}, indent=1))


if __name__ == "__main__":
    main()
