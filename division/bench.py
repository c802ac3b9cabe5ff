"""Throughput of the DIVISION codec on large activations: fused Triton kernels vs the torch reference.

    python -m division.bench --out bench.json            # the table below, on CUDA
    python -m division.bench --quick                     # two shapes only
    python -m division.bench --sweep                     # also compare kernel tunings (TUNING knobs)
    python -m division.bench --sweep --sweep-first --autotune --out b.json   # sweep, then the
                                                         # table with the best encode / decode knobs

For each activation (shape, dtype, memory format) it times ``encode`` (compress) and ``decode``
(decompress) of ``TritonDivisionCodec`` and of the reference ``DivisionCodec`` (B=8, Q=2,
stochastic rounding): after a warm-up (which also compiles the kernels), calls run back to back
between two CUDA events, cycling over enough copies of the input that none is served from L2;
the time per call is the median over batches (``Timer``). Bandwidth counts the bytes each
step must move at least: compress reads x and writes the stored tensors (lfc, codes, mn, step),
decompress reads them and writes x. It is compared with the device's copy bandwidth measured in the
same run (``dst.copy_(src)`` of 1 GiB, read + write bytes). "combined" is (compress bytes +
decompress bytes) / (compress time + decompress time), as a fraction of copy bandwidth.

Prints a table and writes JSON (``--out``), updated after every row so a cut-short run keeps what
it measured; ``scripts/bench_records.py`` turns it into results-store records for ``mode=report``.
Needs no Hydra or wandb.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

SHAPES = [(256, 64, 56, 56), (256, 256, 56, 56), (256, 512, 28, 28), (128, 2048, 7, 7)]
QUICK_SHAPES = [(256, 64, 56, 56), (128, 2048, 7, 7)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Tuning variants for --sweep: (label, TUNING overrides, codec knobs, cases (None: all SWEEP_CASES))
SWEEP = [
    ("default", {}, {}, None),
    ("enc_w1", {"enc_warps": 1}, {}, None),
    ("enc_w4", {"enc_warps": 4}, {}, None),
    ("mode0", {"encode_mode": 0}, {}, None),
    ("mode1", {"encode_mode": 1}, {}, None),
    ("mode0_w1", {"encode_mode": 0, "enc_warps": 1, "max_tile": 1024}, {}, None),
    ("group64k", {"group_bytes": 65536}, {}, None),
    ("dec_w8", {"dec_warps": 8}, {}, None),
    ("dec_row", {"decode_row": True}, {}, None),
    ("tile1024", {"max_tile": 1024}, {}, None),
    ("flat", {"force_flat": True}, {}, (0, 3)),
    ("nearest", {}, {"rounding": "nearest"}, (0, 2)),
    ("philox", {"rng": 1}, {}, (0,)),
]
SWEEP_CASES = [((256, 64, 56, 56), "fp32", False), ((256, 64, 56, 56), "bf16", True),
               ((128, 2048, 7, 7), "fp32", False), ((256, 512, 28, 28), "bf16", False)]


class Timer:
    """GPU time per call of ``fn(i)``: calls run back to back between two CUDA events (so the host's
    launch overhead overlaps the previous call, as in a training step), ``i`` cycling over inputs
    whose total size is at least 3x the L2 cache (so nothing is served from L2 across calls);
    the median over ``reps`` batches. Also the host time per call (median, no synchronisation)."""

    def __init__(self, device: torch.device):
        props = torch.cuda.get_device_properties(device)
        self.l2 = int(getattr(props, "L2_cache_size", 0) or (64 << 20))

    def copies(self, nbytes: int) -> int:
        return max(1, math.ceil(3 * self.l2 / max(nbytes, 1)))

    def __call__(self, fn: Callable[[int], Any], n_inputs: int = 1, reps: int = 7,
                 min_batch_s: float = 2e-3) -> dict[str, float]:
        fn(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(0)
        torch.cuda.synchronize()
        est = max(time.perf_counter() - t0, 1e-6)
        batch = int(min(64, max(n_inputs, math.ceil(min_batch_s / est))))
        times, host = [], []
        for r in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(batch):
                h0 = time.perf_counter()
                fn(i % n_inputs)
                host.append(time.perf_counter() - h0)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e-3 / batch)
        return {"s": statistics.median(times), "host_s": statistics.median(host), "batch": batch}


def code_version() -> Optional[str]:
    """The code measured, as the framework's records name it: ``$DIVISION_CODE_VERSION``, else the
    checkout's ``git describe --always --dirty``; None outside a checkout."""
    if os.environ.get("DIVISION_CODE_VERSION", "").strip():
        return os.environ["DIVISION_CODE_VERSION"].strip()
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return out or None
    except (OSError, subprocess.SubprocessError):
        return None


def copy_bandwidth(timer: Timer, device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = timer(lambda i: dst.copy_(src))["s"]
    del src, dst
    return 2 * nbytes / t


def make_input(shape, dtype, channels_last: bool, device) -> torch.Tensor:
    x = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)  # BN-output-like
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def measure(codec, x: torch.Tensor, timer: Timer, reps: int) -> dict[str, float]:
    xbytes = x.numel() * x.element_size()
    k = timer.copies(xbytes)
    xs = [x] + [x.clone(memory_format=torch.preserve_format) for _ in range(k - 1)]
    packs = [codec.encode(v) for v in xs]
    stored = packs[0].nbytes
    tc = timer(lambda i: codec.encode(xs[i]), n_inputs=k, reps=reps)
    td = timer(lambda i: codec.decode(packs[i]), n_inputs=k, reps=reps)
    xh = codec.decode(packs[0])
    step = packs[0].tensors["step"].float()[:, :, None, None]
    err = ((xh.float() - x.float()).abs() / step.clamp_min(1e-30)).amax().item()
    t_c, t_d = tc["s"], td["s"]
    del xs, packs, xh
    return {"compress_s": t_c, "decompress_s": t_d, "compress_host_s": tc["host_s"],
            "decompress_host_s": td["host_s"], "copies": k,
            "compress_bytes": xbytes + stored, "decompress_bytes": stored + xbytes, "stored_bytes": stored,
            "compress_GBps": (xbytes + stored) / t_c / 1e9, "decompress_GBps": (stored + xbytes) / t_d / 1e9,
            "combined_GBps": 2 * (xbytes + stored) / (t_c + t_d) / 1e9, "max_err_over_step": err,
            # the host needs this long to issue one call: at >= 80 % of the per-call time the GPU
            # may idle between calls, and the kernel itself is faster than the time shown
            "compress_host_bound": tc["host_s"] >= 0.8 * t_c, "decompress_host_bound": td["host_s"] >= 0.8 * t_d}


def _fmt_row(r: dict[str, Any], copy_gbps: float) -> str:
    f = r["fast"]
    hc = "*" if f.get("compress_host_bound") else " "
    hd = "*" if f.get("decompress_host_bound") else " "
    s = (f"{str(tuple(r['shape'])):>20} {r['dtype']:>4} {r['format']:>5} | "
         f"{f['compress_s'] * 1e3:7.3f}{hc}ms {f['compress_GBps']:6.0f} GB/s {f['compress_GBps'] / copy_gbps:5.0%} | "
         f"{f['decompress_s'] * 1e3:7.3f}{hd}ms {f['decompress_GBps']:6.0f} GB/s {f['decompress_GBps'] / copy_gbps:5.0%} | "
         f"comb {f['combined_GBps'] / copy_gbps:5.0%}")
    ref = r.get("ref")
    if ref:
        s += (f" | ref {ref['compress_s'] * 1e3:7.2f} / {ref['decompress_s'] * 1e3:6.2f} ms"
              f" (x{(ref['compress_s'] + ref['decompress_s']) / (f['compress_s'] + f['decompress_s']):.1f})")
    return s


ENCODE_VARIANTS = ("default", "enc_w1", "enc_w4", "mode0", "mode1", "mode0_w1", "group64k", "tile1024")
DECODE_VARIANTS = ("default", "dec_w8", "dec_row", "tile1024", "group64k")


def pick_tuning(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """The encode variant with the best geometric-mean compress time over the sweep cases, and the
    decode variant with the best decompress time (only variants measured on every case count)."""
    def best(names, key):
        by: dict[str, list[float]] = {}
        for r in sweep:
            if r.get("variant") in names and key in r:
                by.setdefault(r["variant"], []).append(r[key])
        n = max((len(v) for v in by.values()), default=0)
        score = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in by.items() if len(v) == n}
        return min(score, key=score.get) if score else "default"

    tun_of = {label: tun for label, tun, _, _ in SWEEP}
    enc, dec = best(ENCODE_VARIANTS, "compress_s"), best(DECODE_VARIANTS, "decompress_s")
    chosen = {k: v for k, v in tun_of[enc].items()}
    for k, v in tun_of[dec].items():
        chosen.setdefault(k, v)
    print(f"autotune: best encode variant {enc!r}, best decode variant {dec!r}")
    return chosen


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    ap.add_argument("--quick", action="store_true", help="two shapes, fp32 and bf16")
    ap.add_argument("--sweep", action="store_true", help="also time tuning variants (SWEEP)")
    ap.add_argument("--sweep-first", action="store_true", help="run the sweep before the table")
    ap.add_argument("--autotune", action="store_true",
                    help="with --sweep-first: run the table with the sweep's best encode and decode "
                         "variants (geometric mean over SWEEP_CASES)")
    ap.add_argument("--no-ref", action="store_true", help="skip the torch reference")
    ap.add_argument("--reps", type=int, default=7, help="timed batches per measurement")
    ap.add_argument("--ref-reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop starting new rows after this")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("division.bench needs a CUDA device (the fused kernels run there); nothing measured.")
        return 2

    import triton

    from . import triton_codec as tc
    from .dual_precision import DivisionCodec

    t_start = time.perf_counter()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(dev)
    timer = Timer(dev)
    copy_bps = copy_bandwidth(timer, dev)
    copy_gbps = copy_bps / 1e9
    result: dict[str, Any] = {
        "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "command": " ".join(["python -m division.bench"] + (argv if argv is not None else sys.argv[1:])),
        "code_version": code_version(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "copy_GBps": copy_gbps, "tuning": dict(tc.TUNING), "rows": [], "sweep": [],
        "codec": {"block_size": 8, "bits": 2, "rounding": "stochastic"},
    }

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str))

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - t_start > args.budget_s

    print(f"{props.name}: copy bandwidth {copy_gbps:.0f} GB/s (1 GiB copy_, read + write)")
    save()

    def run_table():
        print(f"\n{'shape':>20} {'':>4} {'':>5} | {'compress':^29} | {'decompress':^29} |")
        shapes = QUICK_SHAPES if args.quick else SHAPES
        fast = tc.TritonDivisionCodec(block_size=8, bits=2, rounding="stochastic")
        ref = DivisionCodec(block_size=8, bits=2, rounding="stochastic")
        for shape in shapes:
            for dname, dtype in DTYPES.items():
                for cl in (False, True):
                    if over_budget():
                        result["truncated"] = True
                        break
                    x = make_input(shape, dtype, cl, dev)
                    plan = fast.plan_for(x.shape, x.dtype, cl, x.device)
                    row = {"shape": list(shape), "dtype": dname, "format": "NHWC" if cl else "NCHW",
                           "plan": plan.__dict__ if plan else None}
                    row["fast"] = measure(fast, x, timer, args.reps)
                    if not args.no_ref:
                        try:
                            row["ref"] = measure(ref, x, timer, args.ref_reps)
                        except torch.cuda.OutOfMemoryError:
                            row["ref"] = None
                        torch.cuda.empty_cache()
                    row["fast"]["combined_frac_of_copy"] = row["fast"]["combined_GBps"] / copy_gbps
                    result["rows"].append(row)
                    print(_fmt_row(row, copy_gbps), flush=True)
                    save()
                    del x
                    torch.cuda.empty_cache()

    def run_sweep():
        print("\nsweep (tuning variants):")
        base = dict(tc.TUNING)
        for ci, (shape, dname, cl) in enumerate(SWEEP_CASES):
            x = make_input(shape, DTYPES[dname], cl, dev)
            for label, tun, knobs, cases in SWEEP:
                if cases is not None and ci not in cases:
                    continue
                if over_budget():
                    result["truncated"] = True
                    break
                tc.TUNING.clear()
                tc.TUNING.update(base, **tun)
                try:
                    codec = tc.TritonDivisionCodec(**{"rounding": "stochastic", **knobs})
                    plan = codec.plan_for(x.shape, x.dtype, cl, x.device)
                    m = measure(codec, x, timer, max(3, args.reps // 2))
                    rec = {"shape": list(shape), "dtype": dname, "format": "NHWC" if cl else "NCHW",
                           "variant": label, "tuning": tun, "knobs": knobs,
                           "plan": plan.__dict__ if plan else None, **m}
                    print(f"{str(shape):>20} {dname} {'NHWC' if cl else 'NCHW'} {label:>10}: "
                          f"c {m['compress_s'] * 1e3:7.3f} ms ({m['compress_GBps'] / copy_gbps:4.0%})  "
                          f"d {m['decompress_s'] * 1e3:7.3f} ms ({m['decompress_GBps'] / copy_gbps:4.0%})  "
                          f"comb {m['combined_GBps'] / copy_gbps:4.0%}  G={plan.g if plan else '-'}", flush=True)
                except Exception as exc:  # noqa: BLE001 - a failing variant is a result too
                    rec = {"shape": list(shape), "dtype": dname, "variant": label, "error": repr(exc)}
                    print(f"{str(shape):>20} {dname} {label}: ERROR {exc!r}", flush=True)
                finally:
                    tc.TUNING.clear()
                    tc.TUNING.update(base)
                result["sweep"].append(rec)
                save()
            del x
            torch.cuda.empty_cache()

    if args.sweep and args.sweep_first:
        run_sweep()
        if args.autotune:
            chosen = pick_tuning(result["sweep"])
            result["table_tuning"] = chosen
            tc.TUNING.update(chosen)
            print(f"\nautotune: table runs with TUNING overrides {chosen}")
    run_table()
    if args.sweep and not args.sweep_first:
        run_sweep()
    result["elapsed_s"] = time.perf_counter() - t_start
    save()
    rows = result["rows"]
    if rows:
        fr = [r["fast"]["combined_frac_of_copy"] for r in rows]
        print(f"\ncombined compress+decompress: {min(fr):.0%} .. {max(fr):.0%} of copy bandwidth "
              f"(geo-mean {math.exp(sum(map(math.log, fr)) / len(fr)):.0%}); {result['elapsed_s']:.0f} s")
        print("*: host time per call >= 80 % of the measured time (launch-bound: the kernel is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
