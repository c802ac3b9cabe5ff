"""Gradient fidelity on real images: per-layer cosine similarity and relative error of DIVISION's
parameter gradients against exact backward, for several bit widths.

    python scripts/gradient_fidelity.py --root ../shared/data/cifar10-jpeg --model resnet18 \
        --images 256 --bits 1 2 4 8 --out outputs/fidelity.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import build_datasets, sample_batch  # noqa: E402
from division.fidelity import gradient_fidelity  # noqa: E402
from models import build_model  # noqa: E402


def real_batch(root: str, count: int):
    """``count`` validation images of an ImageFolder tree, spread evenly over it (so over the classes)."""
    _, val_ds, info = build_datasets("imagefolder", root=root, transforms="cifar", num_classes=None)
    return (*sample_batch(val_ds, count), info["num_classes"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="ImageFolder tree with train/ and val/ or test/")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper-decode", action="store_true",
                   help="method.relu_zeros=false: ReLU outputs decode without their mask's zeros")
    p.add_argument("--out", default=None, help="write the full per-layer report as JSON")
    args = p.parse_args()
    images, labels, classes = real_batch(args.root, args.images)
    images, labels = images.to(args.device), labels.to(args.device)
    reports = []
    print(f"{args.model}, {args.images} real images, B={args.block_size}")
    print(f"{'bits':>4} {'overall cosine':>15} {'overall rel.err':>16} {'worst layer cosine':>19}")
    for bits in args.bits:
        r = gradient_fidelity(lambda: build_model(args.model, num_classes=classes), "division", images, labels,
                              block_size=args.block_size, bits=bits, backend="torch",
                              relu_zeros=not args.paper_decode)
        reports.append(r)
        print(f"{bits:>4} {r['overall_cosine']:>15.5f} {r['overall_rel_error']:>16.4f} {r['worst_cosine']:>19.4f}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
