"""DIVISION's fused kernels inside a compiled graph (division/compiled_ops.py): the graph calls the
fused encode and decode, keeps what they write, and trains like the same layers run eagerly.
Under the interpreter these are the opaque ``division::encode_opaque`` / ``decode_opaque`` ops,
which share everything but the launch with the ``triton_op``s a GPU compiles (the ``gpu`` test below).

The kernels run on the CPU through Triton's interpreter, which has to be switched on before the
kernels' module loads: the checks run in a subprocess started with TRITON_INTERPRET=1, beside the
rest of the suite from the end of collection (tests/background.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import background

ROOT = Path(__file__).resolve().parents[1]


def _checks(inductor: bool) -> dict:
    """Run in the interpreter subprocess; returns what the tests assert on. ``inductor``: also
    compile with inductor (a minute of C++ code generation on the CPU: the slow test)."""
    import torch
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from division.compiled import CompiledLayers, TensorCodec
    from division.triton_codec import TritonDivisionCodec
    from tests.test_compiled import batch, small_net, step, cosine

    codec = TensorCodec(block_size=4, bits=4, rounding="nearest", fused=True, fused_norm=True)
    n = 4  # images: the interpreter's time grows with the batch, what is checked does not
    x, y = batch(n)
    graphs = {}

    def backend(gm, example_inputs):
        def keep(name):
            def compiler(g, _):
                graphs[name] = [str(n.target) for n in g.graph.nodes if n.op == "call_function"]
                return g.forward
            return compiler
        # inductor's partitioner: it merges equal encodes and decides what is saved
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                                     partition_fn=min_cut_rematerialization_partition)

    out = {}
    eager_net = small_net()
    CompiledLayers(eager_net, codec, eager=True)  # the same functions and ops, run eagerly
    _, eager_grads = step(eager_net, x, y)
    for name, compiler in (("aot", backend), ("inductor", "inductor"))[:2 if inductor else 1]:
        net = small_net()
        CompiledLayers(net, codec)
        run = _compiled_step(net, x, y, compiler)
        out[name] = {"cosine_to_eager": cosine(run["grads"], eager_grads), "codes_bytes": run["codes_bytes"]}
    out["forward_ops"] = graphs["forward"]
    out["backward_ops"] = graphs["backward"]
    # what the eager fused codec keeps of the same activations (the ReLU masks beside them: 1 bit)
    triton = TritonDivisionCodec(block_size=4, bits=4, rounding="nearest")
    codes = lambda *shape: triton.encode(torch.randn(*shape)).tensors["codes"].numel()  # noqa: E731
    masks = (n * 16 * 16 * 16 + 2 * n * 32 * 16 * 16) // 8
    out["eager_codes_bytes"] = (2 * codes(n, 16, 16, 16) + codes(n, 3, 16, 16) + 3 * codes(n, 32, 16, 16)
                                + codes(n, 32) + masks)
    from division import compiled_ops
    out["applies_cpu_tensor_interpreted"] = compiled_ops.applies(x, 4, 4, False)
    out["rebuild"] = _rebuild_checks(codec, x, y, backend, graphs)
    out["norm"] = _norm_checks(codec, x, y, backend, graphs)
    out["norm_relu"] = _norm_relu_checks(codec, x, y, backend, graphs)
    out["norm_residual"] = _norm_residual_checks(codec, backend, graphs)
    out["norm_encode_ops"] = _norm_encode_op_checks()
    return out


def _norm_encode_op_checks() -> dict:
    """The fused BatchNorm op's own function (``_norm_encode_into``, as ``norm_encode`` runs it) on
    a channels_last map: the tensor ops it dispatches (traced into a GPU graph, each one a kernel
    or an allocation there) and its outputs against ``torch.native_batch_norm``."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from division import compiled_ops

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 16, 8, 8, generator=g) * 3 + 1).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    with Ops() as ops:
        y, mean, invstd, var, *_ = compiled_ops._norm_encode_into(x, weight, bias, 1e-5, 4, 4, False, False,
                                                                 compiled_ops._direct_launch)
    want, want_mean, want_invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.1, 1e-5)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    return {"ops": sorted(set(ops.names)), "y": rel(y.permute(0, 3, 1, 2), want), "mean": rel(mean, want_mean),
            "invstd": rel(invstd, want_invstd), "var": rel(var, x.var(dim=(0, 2, 3), unbiased=True))}


def _norm_residual_checks(codec, backend, graphs, device: str = "cpu") -> dict:
    """torchvision's BasicBlock ResNet (one block per stage), channels_last, with the fused
    BatchNorm: each block adds its shortcut into bn2's output in place (``out += identity``), which
    autograd refuses on a view that a custom function returned. The same functions run eagerly and
    compiled. ``graphs``: the traced ops of ``backend`` (None: not counted)."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from division.compiled import CompiledLayers
    from tests.test_compiled import cosine

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last).to(device)
    y = torch.tensor([1, 7], device=device)
    runs = {}
    for eager in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
        net = net.to(device, memory_format=torch.channels_last)
        layers = CompiledLayers(net, codec, eager=eager)
        layers.chain.prove(net, layers.modules, (x,))
        F.cross_entropy((net if eager else torch.compile(net, backend=backend))(x), y).backward()
        runs[eager] = {"grads": {n: p.grad.clone() for n, p in net.named_parameters()},
                       "absorbed": len(layers.chain.absorbed)}
    return {"absorbed": [runs[True]["absorbed"], runs[False]["absorbed"]],
            "norm_encodes": None if graphs is None else graphs["forward"].count("division.norm_encode_opaque.default"),
            "cosine": cosine(runs[True]["grads"], runs[False]["grads"])}


def _norm_relu_checks(codec, x, y, backend, graphs) -> dict:
    """The channels_last ``small_net`` compiled with and without the ReLUs folded into the fused
    BatchNorms (``ConvInputChain.fused_relu``), with ``rebuild_conv_input`` off and on."""
    import torch
    from division.compiled import CompiledLayers
    from tests.test_compiled import small_net, cosine

    inputs = x.contiguous(memory_format=torch.channels_last)
    out = {}
    for rebuild in (False, True):
        runs = {}
        for fold in (True, False):
            torch._dynamo.reset()
            net = small_net().to(memory_format=torch.channels_last)
            layers = CompiledLayers(net, codec, rebuild_conv_input=rebuild)
            layers.chain.fused_relu = fold
            layers.chain.prove(net, layers.modules, (inputs,))
            runs[fold] = dict(_compiled_step(net, inputs, y, backend), absorbed=layers.chain.absorbed,
                              relus=sum("relu" in op for op in graphs["forward"]))
        out["rebuild" if rebuild else "plain"] = {
            "absorbed": runs[True]["absorbed"], "relus": [runs[True]["relus"], runs[False]["relus"]],
            "uint8_bytes": [runs[True]["codes_bytes"], runs[False]["codes_bytes"]],
            "cosine": cosine(runs[True]["grads"], runs[False]["grads"]),
            "worst_relative": _worst_relative(runs[True]["grads"], runs[False]["grads"]),
            "running_worst_relative": _worst_relative(runs[True]["running"], runs[False]["running"])}
    return out


def _compiled_step(net, inputs, y, backend) -> dict:
    """One compiled training step of ``net``: its gradients, running statistics and the bytes of
    the uint8 tensors (codes and masks) autograd kept."""
    import torch
    import torch.nn.functional as F
    from division.compiled import _identity

    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, _identity):
        loss = F.cross_entropy(torch.compile(net, backend=backend)(inputs), y)
    loss.backward()
    return {"grads": {n: p.grad.clone() for n, p in net.named_parameters()},
            "running": {n: b.clone() for n, b in net.named_buffers() if b.is_floating_point()},
            "codes_bytes": sum(t.numel() for t in kept if t.dtype == torch.uint8)}


def _worst_relative(a: dict, b: dict) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max() / b[n].float().abs().max().clamp_min(1e-12))
               for n in a)


def _norm_checks(codec, x, y, backend, graphs) -> dict:
    """A channels_last ``small_net`` compiled (aot, inductor's partitioner), its BatchNorms run by the
    fused encode (``norm_encode``) and their backward from the codes (``norm_backward``), against
    the same run with ``fused_norm`` off (the default): the BatchNorms in tensor ops beside a separate
    encode."""
    import dataclasses

    import torch
    from division.compiled import CompiledLayers
    from tests.test_compiled import small_net, cosine

    runs = {}
    inputs = x.contiguous(memory_format=torch.channels_last)
    for fused in (True, False):
        torch._dynamo.reset()
        net = small_net().to(memory_format=torch.channels_last)
        CompiledLayers(net, dataclasses.replace(codec, fused_norm=fused))
        runs[fused] = dict(_compiled_step(net, inputs, y, backend), forward=list(graphs["forward"]),
                           backward=list(graphs["backward"]))
    fused, composed = runs[True], runs[False]
    return {"forward_ops": [op for op in fused["forward"] if op.startswith("division.")],
            "backward_ops": [op for op in fused["backward"] if op.startswith("division.")],
            "off_ops": [op for op in composed["forward"] + composed["backward"] if "norm_" in op],
            "cosine": cosine(fused["grads"], composed["grads"]),
            "worst_relative": _worst_relative(fused["grads"], composed["grads"]),
            "running_worst_relative": _worst_relative(fused["running"], composed["running"]),
            "codes_bytes": [fused["codes_bytes"], composed["codes_bytes"]]}


def _rebuild_checks(codec, x, y, backend, graphs) -> dict:
    """``rebuild_conv_input`` compiled (aot, inductor's partitioner) in both memory formats: the
    backward ops that rebuild a convolution's input, and the gradients against the same run with
    the rebuild composed of a decode and tensor ops (``_fused_rebuild`` off)."""
    import torch
    import torch.nn.functional as F
    from division import compiled_rebuild
    from division.compiled import CompiledLayers
    from tests.test_compiled import small_net, cosine

    def run(channels_last: bool, fused: bool):
        torch._dynamo.reset()
        net = small_net()
        inputs = x
        if channels_last:
            net, inputs = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        layers = CompiledLayers(net, codec, rebuild_conv_input=True)
        layers.chain.prove(net, layers.modules, (inputs,))
        saved = compiled_rebuild._fused_rebuild
        if not fused:
            compiled_rebuild._fused_rebuild = lambda *_: None
        try:
            loss = F.cross_entropy(torch.compile(net, backend=backend)(inputs), y)
            loss.backward()
        finally:
            compiled_rebuild._fused_rebuild = saved
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        return grads, list(graphs["backward"]), sorted(layers.chain.rebuilt)

    out = {}
    for channels_last in (False, True):
        fused, fused_ops, rebuilt = run(channels_last, True)
        composed, composed_ops, _ = run(channels_last, False)
        worst = _worst_relative(fused, composed)
        out["channels_last" if channels_last else "contiguous"] = {
            "rebuilt": rebuilt, "cosine": cosine(fused, composed), "worst_relative": worst,
            "affine_decodes": fused_ops.count("division.decode_affine_opaque.default"),
            "plain_decodes": fused_ops.count("division.decode_opaque.default"),
            "composed_affine_decodes": composed_ops.count("division.decode_affine_opaque.default"),
            "composed_plain_decodes": composed_ops.count("division.decode_opaque.default")}
    return out


def _main(path: str, inductor: str) -> None:
    background.skip_dropped_overflow_checks()
    Path(path).write_text(json.dumps(_checks(inductor == "1")))


def _command(inductor: bool):
    def command(out_path: str) -> list[str]:
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import tests.test_compiled_ops as T; "
                "T._main(sys.argv[2], sys.argv[3])")
        return [sys.executable, "-c", code, str(ROOT), out_path, "1" if inductor else "0"]
    return command


BACKGROUND = {"interpreted": _command(inductor=False)}  # started after collection (tests/background.py)


@pytest.fixture(scope="module")
def interpreted():
    return background.result(f"{__name__}.interpreted", _command(inductor=False))


def test_compiled_graph_calls_the_fused_encode_and_decode(interpreted):
    fwd, bwd = interpreted["forward_ops"], interpreted["backward_ops"]
    # conv0, bn0, the block input (read by conv1 and the shortcut: one encode), bn1, conv2, bn2, linear
    assert fwd.count("division.encode_opaque.default") == 7, fwd
    assert bwd.count("division.decode_opaque.default") >= 7, bwd
    assert "division.decode_opaque.default" not in fwd and "division.encode_opaque.default" not in bwd


def test_compiled_fused_layers_train_like_the_same_layers_run_eagerly(interpreted):
    assert interpreted["aot"]["cosine_to_eager"] > 0.9999, interpreted["aot"]
    assert interpreted["aot"]["codes_bytes"] == interpreted["eager_codes_bytes"]


@pytest.mark.slow
def test_inductor_compiles_the_fused_ops_and_keeps_what_eager_keeps():
    checks = background.result(f"{__name__}.inductor", _command(inductor=True))
    assert checks["inductor"]["cosine_to_eager"] > 0.9999, checks["inductor"]
    assert checks["inductor"]["codes_bytes"] == checks["eager_codes_bytes"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compiled_rebuild_is_one_fused_decode_with_the_affine_map_and_mask(interpreted, layout):
    """``rebuild_conv_input`` compiled with the fused codec: a rebuilt convolution input
    (ReLU(BN(x)) of bn0 for the block's conv1 and shortcut, of bn1 for conv2) is one
    ``decode_affine`` of the BatchNorm input's codes, not a decode written out and then scaled and
    masked by tensor ops (on a GPU: three full-size passes instead of one), with the gradients of
    that composition."""
    checks = interpreted["rebuild"][layout]
    assert checks["rebuilt"] == ["3.conv1", "3.conv2", "3.shortcut"], checks
    # two: ReLU(bn1) for conv2, ReLU(bn0) for conv1 and the shortcut (equal opaque ops, which the
    # partitioner merges; a GPU's traced ops are never merged, as the plain decodes)
    assert checks["affine_decodes"] == 2 and checks["composed_affine_decodes"] == 0, checks
    # the plain decodes are the layers' own: conv0's input, the Linear's and, in NCHW, the
    # BatchNorms' inputs (which the composed rebuilds shared here, merged as equal ops); a
    # channels_last BatchNorm's backward reads its codes (norm_backward), so there the composed
    # rebuilds decode for themselves
    plain, composed = {"contiguous": (5, 5), "channels_last": (2, 4)}[layout]
    assert (checks["plain_decodes"], checks["composed_plain_decodes"]) == (plain, composed), checks
    assert checks["cosine"] > 0.999999 and checks["worst_relative"] < 1e-4, checks


def test_compiled_batch_norm_runs_in_its_input_encode_and_its_backward_reads_the_codes(interpreted):
    """``TensorCodec(fused_norm=True)``, channels_last: each BatchNorm is one ``norm_encode``
    (statistics, output and its input's codes from two reads of the input, where the BatchNorm's kernels and a separate encode read it
    three or four times) and one ``norm_backward`` from the codes (no decode); the other inputs
    (conv0's, the block input, conv2's, the Linear's) are encoded as before. The gradients and
    running statistics are those of the BatchNorm in tensor ops beside the encode, and the codes kept
    the same bytes."""
    checks = interpreted["norm"]
    fwd, bwd = checks["forward_ops"], checks["backward_ops"]
    assert fwd.count("division.norm_encode_opaque.default") == 3, fwd
    assert fwd.count("division.encode_opaque.default") == 4, fwd
    assert bwd.count("division.norm_backward_opaque.default") == 3, bwd
    assert bwd.count("division.decode_opaque.default") == 4, bwd
    assert checks["off_ops"] == [], checks  # TensorCodec(fused_norm=False), the default
    assert checks["cosine"] > 0.999999 and checks["worst_relative"] < 1e-4, checks
    assert checks["running_worst_relative"] < 1e-5, checks
    assert checks["codes_bytes"][0] == checks["codes_bytes"][1] > 0, checks


@pytest.mark.parametrize("knobs", ["plain", "rebuild"])
def test_compiled_batch_norm_applies_the_relu_that_reads_its_output(interpreted, knobs):
    """A ReLU module that alone reads a channels_last BatchNorm's output (bn0's and bn1's in
    ``small_net``; not the block's last ReLU, which reads bn2 plus the shortcut) is folded into
    the fused BatchNorm: the kernel writes ReLU(BN(x)) and the ReLU's mask, the traced forward
    has no ReLU op of its own for them, the same bytes are kept (the mask moves from the ReLU to
    the BatchNorm) and the gradients and running statistics are those of the two apart."""
    checks = interpreted["norm_relu"][knobs]
    assert checks["absorbed"] == {"1": "2", "3.bn1": "3.relu1"}, checks
    assert checks["relus"][1] - checks["relus"][0] == 2, checks
    assert checks["uint8_bytes"][0] == checks["uint8_bytes"][1] > 0, checks
    assert checks["cosine"] > 0.999999 and checks["worst_relative"] < 1e-5, checks
    assert checks["running_worst_relative"] < 1e-6, checks


def test_compiled_batch_norm_output_takes_a_residual_sum_in_place(interpreted):
    """torchvision's ResNet adds each block's shortcut into its last BatchNorm's output in place.
    The fused BatchNorm's output is no view (autograd refuses an in-place op on a view a custom
    function returned, which stopped this eager run), eagerly and compiled; every BatchNorm with
    a plan is fused and the ReLUs after the stem's and the blocks' first BatchNorms are folded."""
    checks = interpreted["norm_residual"]
    assert checks["absorbed"] == [5, 5], checks
    # the stem's, layer1's two and layer2's and layer3's three (the shortcut's too); layer4's maps
    # are 1x1 at 32x32 images, contiguous in both layouts, which the fused BatchNorm leaves alone
    assert checks["norm_encodes"] == 9, checks
    assert checks["cosine"] > 0.9999, checks


def test_fused_batch_norm_writes_the_batch_variance_without_filled_buffers(interpreted):
    """The fused BatchNorm op hands its caller the batch's unbiased variance (for the running
    statistics) from the statistics kernel itself. It used to run that kernel's momentum-1 update on
    two zero-filled buffers: traced into a GPU graph, a fill kernel for each of them, per BatchNorm
    and step. Its output, mean and invstd are ``torch.native_batch_norm``'s."""
    checks = interpreted["norm_encode_ops"]
    assert not [op for op in checks["ops"] if "zero" in op or "fill" in op or op == "full"], checks
    assert checks["var"] < 1e-5 and checks["mean"] < 1e-5 and checks["invstd"] < 1e-5, checks
    assert checks["y"] < 1e-5, checks


def test_cpu_tensors_take_the_fused_ops_only_under_the_interpreter(interpreted):
    import torch
    from division import compiled_ops
    assert interpreted["applies_cpu_tensor_interpreted"] is True
    from division.triton_launch import interpreting
    if not interpreting():
        assert compiled_ops.applies(torch.randn(8, 3, 16, 16), 4, 4, False) is False


@pytest.mark.gpu
def test_gpu_inductor_fused_batch_norm_output_takes_a_residual_sum_in_place():
    """The interpreter's residual-sum test (``residual_sum_in_place``) on a GPU, through inductor:
    torchvision's BasicBlock ResNet adds each shortcut into the fused BatchNorm's output in place,
    eagerly and compiled, the same ReLUs folded and the same gradients."""
    import torch
    from division.compiled import TensorCodec

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    codec = TensorCodec(block_size=4, bits=4, rounding="nearest", fused=True, fused_norm=True)
    checks = _norm_residual_checks(codec, "inductor", None, device="cuda")
    assert checks["absorbed"] == [5, 5], checks
    assert checks["cosine"] > 0.9999, checks


@pytest.mark.gpu
def test_gpu_inductor_launches_the_fused_kernels_from_its_own_code():
    """On a GPU the graph's encodes and decodes are ``triton_op``s: inductor's generated code
    launches ``_encode_kernel`` / ``_decode_kernel`` itself (no call back into Python ops), keeps
    the codes eager DIVISION keeps, and gives the gradients of the same layers run eagerly."""
    import torch
    import torch.nn.functional as F
    from torch._inductor.utils import run_and_get_code

    from division.compiled import CompiledLayers, TensorCodec, _identity
    from tests.test_compiled import batch, cosine, small_net, step

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    codec = TensorCodec(block_size=4, bits=4, rounding="nearest", fused=True)
    x, y = (t.cuda() for t in batch())
    eager_net = small_net().cuda()
    CompiledLayers(eager_net, codec, eager=True)
    eager_kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: eager_kept.append(t) or t, _identity):
        _, eager_grads = step(eager_net, x, y)
    net = small_net().cuda()
    CompiledLayers(net, codec)
    run = torch.compile(net)
    kept = []

    def train_step():
        net.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, _identity):
            loss = F.cross_entropy(run(x), y)
        loss.backward()

    _, code = run_and_get_code(train_step)
    code = "\n".join(code)
    assert "_encode_kernel" in code and "_decode_kernel" in code
    assert "division.encode" not in code and "division.decode" not in code
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    assert cosine(grads, eager_grads) > 0.9999
    # the compiled graph keeps the codes eager DIVISION keeps, compared by size: inductor may keep
    # a mask as (n, 1) where eager keeps (n,), and its fused kernels round differently, so the
    # bytes may differ. And nothing full-size in floating point: the smallest activation here is
    # 8 x 16 x 16 x 16 elements; the largest float kept is a weight or a low-frequency part.
    from collections import Counter
    sizes = lambda ts: Counter(t.numel() for t in ts if t.dtype == torch.uint8)  # noqa: E731
    assert sizes(kept) == sizes(eager_kept)
    assert max(t.numel() for t in kept if t.is_floating_point()) < 8 * 16 * 16 * 16


@pytest.mark.gpu
@pytest.mark.parametrize("rebuild", [False, True])
def test_gpu_inductor_launches_the_fused_batch_norm_and_rebuild_kernels(rebuild):
    """channels_last on a GPU: inductor's code launches the BatchNorm carried by the encode (its
    statistics kernel; with the ReLU after it where one follows), its backward from the codes
    (``_reduce_kernel``, ``_input_grad_kernel``) and, with ``rebuild_conv_input``, the fused rebuild decode; the gradients are those of the same
    layers run eagerly (the same ops, called outside a graph)."""
    import torch
    import torch.nn.functional as F
    from torch._inductor.utils import run_and_get_code

    from division.compiled import CompiledLayers, TensorCodec
    from tests.test_compiled import batch, cosine, small_net, step

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    codec = TensorCodec(block_size=4, bits=4, rounding="nearest", fused=True, fused_norm=True)
    x, y = (t.cuda() for t in batch())
    x = x.contiguous(memory_format=torch.channels_last)

    def layers(net, eager):
        made = CompiledLayers(net, codec, eager=eager, rebuild_conv_input=rebuild)
        made.chain.prove(net, made.modules, (x,))  # the links, and the ReLUs the BatchNorms apply
        return made
    eager_net = small_net().cuda().to(memory_format=torch.channels_last)
    layers(eager_net, True)
    _, eager_grads = step(eager_net, x, y)
    net = small_net().cuda().to(memory_format=torch.channels_last)
    chain = layers(net, False).chain
    run = torch.compile(net)

    def train_step():
        net.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()

    _, code = run_and_get_code(train_step)
    code = "\n".join(code)
    for kernel in ("_encode_kernel", "_stats_kernel", "_reduce_kernel", "_input_grad_kernel", "_decode_kernel"):
        assert kernel in code, kernel
    assert "division.norm" not in code and "division.decode" not in code
    if rebuild:
        assert sorted(chain.rebuilt) == ["3.conv1", "3.conv2", "3.shortcut"]
    assert chain.absorbed == {"1": "2", "3.bn1": "3.relu1"}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    assert cosine(grads, eager_grads) > 0.9999


def test_kernel_outputs_are_allocated_in_their_layout_without_a_fill_kernel():
    """The fused ops' outputs (a channels_last LFC, a decoded channels_last activation) are made by
    ``compiled_ops._empty_maps``. Made by ``torch.empty(memory_format=channels_last)``, written by
    an op and kept, a buffer got a kernel of its own in inductor's code that filled all of it first
    (on a GPU: one per LFC and per decoded activation of compiled ResNet-50); allocated with its
    strides, none. Checked on the CPU with a custom op standing in for the Triton kernel (the test
    fails with the ``torch.empty`` allocation)."""
    import torch
    from torch._inductor.utils import run_and_get_code
    from division.compiled_ops import _empty_maps

    @torch.library.custom_op("division_test::write_into", mutates_args=("out",),
                             schema="(Tensor x, Tensor(a!) out) -> ()")
    def write_into(x, out):
        out.copy_(x)

    def fill(x, channels_last: bool):
        out = _empty_maps(tuple(x.shape), x.dtype, x.device, channels_last)
        write_into(x, out)
        return out  # as the forward graph returns an LFC: kept for backward

    for channels_last in (True, False):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(2, 8, 4, 4).contiguous(memory_format=fmt)
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(lambda t: fill(t, channels_last)), x)
        code = "\n".join(codes)
        assert "fused_empty" not in code, code
        assert torch.equal(out, x) and out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("channels_last", [True, False])
def test_kernel_output_buffers_are_never_merged_as_common_subexpressions(channels_last):
    """Two equal output buffers of the fused ops stay two buffers through the compiler's
    common-subexpression pass. torch 2.11 merged equal ``empty_strided`` calls, so every decode of
    one shape wrote into a copy of one shared buffer and inductor made all the copies in one kernel
    at the start of backward: all those decoded activations alive at once (the GPU test
    ``test_gpu_compiled_decodes_one_at_a_time`` failed on an H100). ``aten.empty`` is never merged."""
    import torch
    from torch._functorch.compile_utils import fx_graph_cse
    from torch.fx.experimental.proxy_tensor import make_fx
    from division.compiled_ops import _empty_maps

    def two(x):
        return tuple(_empty_maps((2, 8, 4, 4), torch.float32, x.device, channels_last) for _ in range(2))

    def used(x):  # the buffers read inside the graph (as a kernel's outputs are), not its outputs
        a, b = two(x)
        return a + 1, b + 2
    graph = fx_graph_cse(make_fx(used)(torch.zeros(1)).graph)
    allocations = [n for n in graph.nodes if n.op == "call_function" and "empty" in str(n.target)]
    assert len(allocations) == 2, graph
    a, b = two(torch.zeros(1))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert a.shape == (2, 8, 4, 4) and a.is_contiguous(memory_format=fmt)
    assert a.data_ptr() != b.data_ptr()
