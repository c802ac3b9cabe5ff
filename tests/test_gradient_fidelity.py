"""DIVISION's parameter gradients against exact backward on a real batch (synthetic without the data).

Measured on resnet20 at initialisation, B = 8 (scripts/gradient_fidelity.py): on 256 real CIFAR-10
JPEGs the overall cosine similarity was 0.911 / 0.991 / 0.9996 / 1.0000 for Q = 1 / 2 / 4 / 8 and the
relative error 0.46 / 0.14 / 0.027 / 0.0016. The bounds below keep a wide margin under those.
"""
from __future__ import annotations

import os

import pytest

from data import build_datasets, sample_batch
from division.fidelity import gradient_fidelity
from models import build_model


def batch(count: int = 128):
    root = os.environ.get("DIVISION_CIFAR10_JPEG")
    if root:
        assert os.path.isdir(root), f"DIVISION_CIFAR10_JPEG={root} is set but is not a folder"
        _, val_ds, _ = build_datasets("imagefolder", root=root, transforms="cifar", num_classes=10)
    else:
        _, val_ds, _ = build_datasets("synthetic", num_classes=10, image_size=32, train_size=64, val_size=count)
    return sample_batch(val_ds, count)


@pytest.fixture(scope="module")
def reports(one_thread):
    images, labels = batch()
    return {bits: gradient_fidelity(lambda: build_model("resnet20", num_classes=10), "division", images, labels,
                                    block_size=8, bits=bits, backend="torch") for bits in (2, 8)}


def test_gradients_are_close_to_exact(reports):
    assert reports[8]["overall_cosine"] > 0.999 and reports[8]["worst_cosine"] > 0.99
    assert reports[2]["overall_cosine"] > 0.95
    for report in reports.values():
        assert len(report["layers"]) == sum(1 for _ in build_model("resnet20", 10).parameters())
        # identical gradients give a cosine of 1 up to rounding (1.0000000000000002 on the real images)
        assert all(-1.0 - 1e-12 <= layer["cosine"] <= 1.0 + 1e-12 and layer["rel_error"] >= 0 for layer in report["layers"])


def test_more_hfc_bits_are_closer(reports):
    assert reports[8]["overall_rel_error"] < reports[2]["overall_rel_error"] / 10
    assert reports[8]["worst_cosine"] > reports[2]["worst_cosine"]


def test_plain_autograd_matches_itself(one_thread):
    """The harness itself adds no difference: with method ``none`` both runs start from the same
    weights and see the same batch, so the gradients are identical."""
    images, labels = batch(16)
    report = gradient_fidelity(lambda: build_model("resnet20", num_classes=10), "none", images, labels)
    assert report["overall_rel_error"] == 0.0 and report["overall_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert all(layer["rel_error"] == 0.0 for layer in report["layers"])
