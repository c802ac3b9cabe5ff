"""scripts/host_time.py: the GPU path's host work runs on the CPU, its kernel launches counted and skipped."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_time_runs_the_fused_codec_path_without_a_gpu():
    """thin_vit (12 blocks): plain training launches no codec kernel; DIVISION encodes at least ten
    saves per block (two LayerNorm inputs, four Linear inputs, the query, key and value, GELU's
    input) and decodes each once in backward, all through the fused codec's launches; ``--knobs``
    reaches the method (rebuild_conv_input: fewer launches by exactly the rebuilt tensors')."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "host_time.py"), "--model", "thin_vit",
                          "--steps", "2", "--methods", "none", "division"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    found = dict(re.findall(r"thin_vit\s+(\w+):\s+[\d.]+ ms per step .*?, (\d+) kernel launches", out.stdout))
    assert set(found) == {"none", "division"}, out.stdout
    assert int(found["none"]) == 0
    assert int(found["division"]) >= 12 * 10 * 2, out.stdout
    # with rebuild_conv_input, each block's two LayerNorm outputs and GELU output are rebuilt in
    # backward, not stored: three encodes and three decodes (one launch each here) fewer per block
    rebuilt = subprocess.run([sys.executable, str(ROOT / "scripts" / "host_time.py"), "--model", "thin_vit",
                              "--steps", "2", "--methods", "division", "--knobs", "rebuild_conv_input=true"],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    launches = re.findall(r"division rebuild_conv_input=True:\s+[\d.]+ ms per step .*?, (\d+) kernel launches",
                          rebuilt.stdout)
    assert launches and int(launches[0]) == int(found["division"]) - 12 * 6, (rebuilt.stdout, found)


def test_host_time_runs_a_network_with_max_pooling():
    """thin_resnet50 (ResNet-50's 16 bottlenecks, 8x narrower, and its max-pooling stem): the
    skipped max-pool decode would hand backward uninitialised indices to scatter through (the
    process crashed); the script sets them valid. DIVISION encodes at least the 53 convolution
    inputs and decodes them in backward."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "host_time.py"), "--model", "thin_resnet50",
                          "--steps", "2", "--methods", "division"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    launches = re.findall(r"thin_resnet50\s+division:\s+[\d.]+ ms per step .*?, (\d+) kernel launches", out.stdout)
    assert launches and int(launches[0]) >= 2 * 53, out.stdout


def test_host_time_channels_last_runs_the_fused_batch_norm_and_counts_allocations():
    """``--channels-last`` (the layout of the GPU speed runs): thin_resnet50's BatchNorms run fused
    into their inputs' encodes, forward and backward (``method.norm_from_codes``): three launches
    each way per BatchNorm, so more launches than with ``norm_from_codes=false``. The allocations
    asked for by name are counted: none of plain training's come from a codec."""
    def run(*extra):
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "host_time.py"), "--model", "thin_resnet50",
                              "--steps", "2", "--channels-last", *extra],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        return {label.strip(): (int(launches), int(allocations)) for label, launches, allocations in re.findall(
            r"thin_resnet50\s+([\w =]+):\s+[\d.]+ ms per step .*?, (\d+) kernel launches skipped, "
            r"(\d+) allocations by name", out.stdout)}
    fused = run("--methods", "none", "division")
    unfused = run("--methods", "division", "--knobs", "norm_from_codes=false")
    assert set(fused) == {"none", "division"} and len(unfused) == 1, (fused, unfused)
    (launches, allocations), = unfused.values()
    # 53 BatchNorms: forward two encode phases and the statistics, backward three kernels, where the
    # unfused path encodes the input (at most two launches) and decodes it once
    assert fused["division"][0] >= launches + 53 * 2, (fused, unfused)
    assert fused["none"][0] == 0 and fused["division"][1] > allocations > fused["none"][1], (fused, unfused)

