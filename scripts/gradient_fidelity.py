"""Gradient fidelity on real images: per-layer cosine similarity and relative error of DIVISION's
parameter gradients against exact backward, for several bit widths.

    python scripts/gradient_fidelity.py --root ../shared/data/cifar10-jpeg --model resnet18 \
        --images 256 --bits 1 2 4 8 --out outputs/fidelity.json --results-dir outputs/results

With ``--results-dir`` each bit width is one record (mode ``fidelity``) in that results store, with the
overall figures (``grad_cosine``, ``grad_rel_error``, ``grad_worst_cosine``), so ``mode=report``
tabulates them like any other run; ``--out`` keeps the per-layer figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import torch
from datetime import datetime, timezone
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import build_datasets, sample_batch  # noqa: E402
from division.fidelity import gradient_fidelity  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402
from runners.record import COMMON_FIELDS, code_version, write_store_row  # noqa: E402


def real_batch(root: str, count: int):
    """``count`` validation images of an ImageFolder tree, spread evenly over it (so over the classes)."""
    _, val_ds, info = build_datasets("imagefolder", root=root, transforms="cifar", num_classes=None)
    return (*sample_batch(val_ds, count), info["num_classes"])


def sharpen(model, scale: float):
    """Scale the query and key projections of every nn.MultiheadAttention and Swin window
    attention by ``scale`` (logits by scale^2): the sharp attention of a trained model, which
    initialisation does not have."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.MultiheadAttention) and m.in_proj_weight is not None:
                m.in_proj_weight[:2 * m.embed_dim] *= scale
            elif isinstance(m, ShiftedWindowAttention):  # Swin's window attention: one qkv Linear
                rows = 2 * m.qkv.out_features // 3
                m.qkv.weight[:rows] *= scale
                if m.qkv.bias is not None:
                    m.qkv.bias[:rows] *= scale
    return model


def make_model(name: str, classes: int):
    """A framework model by name, else a torchvision classification model (random weights).
    A weight matrix initialised to zeros (torchvision ViT's head) is drawn from N(0, 0.02) instead:
    with a zero head no gradient reaches the layers below, and the comparison would be empty."""
    if name in MODEL_NAMES:
        model = build_model(name, num_classes=classes)
    else:
        import torchvision
        model = torchvision.models.get_model(name, weights=None, num_classes=classes)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    return model


def fidelity_record(args, bits: int, report: dict, started_at: str, duration_s: float) -> dict:
    """One bit width's result as a store record: the batch of real images is ``batch_size``."""
    record = dict.fromkeys(COMMON_FIELDS)
    record.update(run_id=uuid.uuid4().hex[:12], mode="fidelity", model=args.model, dataset="imagefolder",
                  method="division", block_size=args.block_size, bits=bits, kernels="pytorch",
                  batch_size=args.images, image_size=args.image_size, device=args.device, precision="fp32", cuda_graph=False, seed=0,
                  group=args.group, status="ok", started_at=started_at, duration_s=round(duration_s, 3),
                  code_version=code_version(), relu_zeros=not args.paper_decode,
                  rebuild_conv_input=args.rebuild_conv_input,
                  recompute_norm_input=args.recompute_norm_input,
                  attention_bits=args.attention_bits, probability_bits=args.probability_bits,
                  grad_cosine=report["overall_cosine"], grad_rel_error=report["overall_rel_error"],
                  grad_worst_cosine=report["worst_cosine"], ledger_ratio=report["ledger_ratio"])
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="ImageFolder tree with train/ and val/ or test/")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the images to this size (bilinear), e.g. 224 for ImageNet-shaped models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention-bits", type=int, default=8,
                   help="method.attention_bits: bits of attention's query, key and value (0: exact)")
    p.add_argument("--probability-bits", type=int, default=4,
                   help="method.probability_bits: bits of softmax outputs, attention written out (0: exact)")
    p.add_argument("--sharpen", type=float, default=1.0,
                   help="scale attention's query and key projections by this (logits by its square)")
    p.add_argument("--paper-decode", action="store_true",
                   help="method.relu_zeros=false: ReLU outputs decode without their mask's zeros")
    p.add_argument("--rebuild-conv-input", action="store_true",
                   help="method.rebuild_conv_input=true: a conv input that is ReLU(BN(x)), and a GELU or SiLU "
                        "output, is rebuilt in backward")
    p.add_argument("--recompute-norm-input", action="store_true",
                   help="method.recompute_norm_input=true: a BatchNorm input made by a 1x1 or depthwise conv is recomputed in backward")
    p.add_argument("--out", default=None, help="write the full per-layer report as JSON")
    p.add_argument("--results-dir", default=None, help="add one record per bit width to this results store")
    p.add_argument("--group", default="gradient_fidelity", help="the records' group (with --results-dir)")
    args = p.parse_args()
    images, labels, classes = real_batch(args.root, args.images)
    images, labels = images.to(args.device), labels.to(args.device)
    if args.image_size:
        images = torch.nn.functional.interpolate(images, size=(args.image_size, args.image_size),
                                                 mode="bilinear", align_corners=False)
    reports = []
    print(f"{args.model}, {args.images} real images, B={args.block_size}, attention_bits={args.attention_bits}, "
          f"probability_bits={args.probability_bits}" + (f", attention sharpened x{args.sharpen}" if args.sharpen != 1 else "")
          + (", conv inputs rebuilt from BatchNorm, GELU / SiLU outputs from their inputs" if args.rebuild_conv_input else "")
          + (", norm inputs recomputed by 1x1 / depthwise convs" if args.recompute_norm_input else ""))
    print(f"{'bits':>4} {'overall cosine':>15} {'overall rel.err':>16} {'worst layer cosine':>19} {'ledger ratio':>13}")
    for bits in args.bits:
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        start = time.perf_counter()
        r = gradient_fidelity(lambda: sharpen(make_model(args.model, classes), args.sharpen), "division", images, labels,
                              block_size=args.block_size, bits=bits, backend="torch",
                              relu_zeros=not args.paper_decode, attention_bits=args.attention_bits,
                              probability_bits=args.probability_bits,
                              rebuild_conv_input=args.rebuild_conv_input,
                              recompute_norm_input=args.recompute_norm_input)
        reports.append(r)
        print(f"{bits:>4} {r['overall_cosine']:>15.5f} {r['overall_rel_error']:>16.4f} {r['worst_cosine']:>19.4f}"
              f" {r['ledger_ratio']:>12.2f}x")
        if args.results_dir:
            write_store_row(fidelity_record(args, bits, r, started_at, time.perf_counter() - start),
                            args.results_dir)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
