"""Every standard way out of PyTorch, measured on injected models; the README's Deploy table is
checked against what is measured here, so it cannot go stale.

Each way out is run on four small hand-made nets, one per kind of site (residual, inception,
dense, channels-last Swin-style), injected with the default identity start and then with the SE
gates moved away from 1 (``fc2`` perturbed), so a dropped or doubled SE block shows. Export and
capture run with grad mode on, the default. Each artifact is run at the export batch (2) and, to
check the dynamic batch, at batch 3, against eager outputs of the same model.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from nets import ChannelsLast, Dense, Inception, OptionalArg, Residual, RootResidual, conv_bn, force_rebuild
from torch import nn
from torchvision.ops.misc import Permute

from se_inject import inject_se, remove_se
from se_inject.errors import PlanMismatchError
from se_inject.inject.attach import attached_hooks
from se_inject.inject.rebuilt import RebuiltBlock
from se_inject.plan import PLAN_ATTR
from se_inject.se_block import GATES, POOLS, SEBlock

README = Path(__file__).resolve().parents[1] / "README.md"
ATOL, RTOL = 1e-5, 1e-4
#: int8 activations and weights: a relative L2 error this small is what a working quantization gives.
INT8_REL_ERROR = 0.05


def _head(c: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]


NETS: dict[str, Callable[[], nn.Module]] = {
    "residual": lambda: nn.Sequential(
        conv_bn(3, 8), nn.ReLU(), Residual(8), Residual(8, 16, stride=2), *_head(16)
    ),
    "inception": lambda: nn.Sequential(
        conv_bn(3, 8), nn.ReLU(), Inception(8, (8, 8), pool_branch=True), nn.ReLU(), Inception(24, (8, 8)), *_head(16)
    ),
    "dense": lambda: nn.Sequential(conv_bn(3, 8), nn.ReLU(), Dense(8, 4, 3), *_head(20)),
    "channels-last": lambda: nn.Sequential(
        nn.Conv2d(3, 16, 4, 4), Permute([0, 2, 3, 1]), ChannelsLast(16), ChannelsLast(16), Permute([0, 3, 1, 2]),
        *_head(16),
    ),
}
#: A real model too, where a layer swap lands on a rebuilt block itself (BasicBlock's conv1/bn1).
NETS["torchvision-resnet18"] = lambda: torchvision.models.resnet18(num_classes=10)
#: The root's own forward performs the residual addition (its SE block attached on the root).
NETS["root-residual"] = RootResidual
#: Branches that end in a function: their blocks are rebuilt, not attached to.
NETS["rebuilt-residual"] = lambda: nn.Sequential(
    conv_bn(3, 8), nn.ReLU(), Residual(8, functional_end=True), Residual(8, 16, stride=2, functional_end=True), *_head(16)
)
SITES = {"residual": 2, "inception": 2, "dense": 3, "channels-last": 2, "torchvision-resnet18": 8, "root-residual": 1,
         "rebuilt-residual": 2}
HAND_MADE = ("residual", "inception", "dense", "channels-last")


def _gates_away_from_one(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SEBlock):
                m.fc2.weight.copy_(torch.randn(m.fc2.weight.shape, generator=gen))
                m.fc2.bias.copy_(torch.randn(m.fc2.bias.shape, generator=gen))
    return model


def _injected(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = NETS[name]().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking BN statistics, so folding them is not a no-op
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    model = inject_se(model)
    assert sum(isinstance(m, SEBlock) for m in model.modules()) == SITES[name]
    return _gates_away_from_one(model)


# --------------------------------------------------------------------------------------------
# the ways out: each takes (model, example input, a folder) and gives back something to run


def _jit_trace(model: nn.Module, x: torch.Tensor, tmp: Path) -> Callable:
    assert torch.is_grad_enabled()
    return torch.jit.trace(model, x, check_trace=True)  # its own check: a retrace must give the same graph


def _jit_script(model: nn.Module, x: torch.Tensor, tmp: Path) -> Callable:
    path = tmp / "scripted.pt"
    torch.jit.save(torch.jit.script(model), path)
    return torch.jit.load(path)


def _pickled(model: nn.Module, x: torch.Tensor, tmp: Path) -> Callable:
    path = tmp / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert list(loaded.state_dict()) == list(model.state_dict())
    kinds = [(type(m).__name__, isinstance(m, RebuiltBlock)) for m in model.modules()]
    assert [(type(m).__name__, isinstance(m, RebuiltBlock)) for m in loaded.modules()] == kinds
    assert getattr(loaded, PLAN_ATTR) == getattr(model, PLAN_ATTR)  # the plan rides along, on any root
    return loaded


def _onnx_runner(path: Path) -> Callable:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda t: torch.from_numpy(session.run(None, {"x": t.numpy()})[0])


def _onnx_legacy(model: nn.Module, x: torch.Tensor, tmp: Path) -> Callable:
    assert torch.is_grad_enabled()
    path = tmp / "legacy.onnx"
    torch.onnx.export(
        model, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    return _onnx_runner(path)


def _batch() -> tuple[dict[int, torch.export.Dim]]:
    return ({0: torch.export.Dim("batch", min=1, max=64)},)


def _onnx_dynamo(model: nn.Module, x: torch.Tensor, tmp: Path) -> Callable:
    assert torch.is_grad_enabled()
    path = tmp / "dynamo.onnx"
    torch.onnx.export(
        model, (x,), path, dynamo=True, input_names=["x"], output_names=["y"], dynamic_shapes=_batch(), verbose=False
    )
    return _onnx_runner(path)


def _export(model: nn.Module, x: torch.Tensor, tmp: Path) -> Callable:
    path = tmp / "exported.pt2"
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=_batch()), path)
    return torch.export.load(path).module()


def _aoti(model: nn.Module, x: torch.Tensor, tmp: Path) -> Callable:
    exported = torch.export.export(model, (x,), dynamic_shapes=_batch())
    path = torch._inductor.aoti_compile_and_package(
        exported,
        package_path=str(tmp / "aoti.pt2"),
        # reason: the generated C++ wrapper is the slow part to compile; O0 halves it here.
        inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"},
    )
    return torch._inductor.aoti_load_package(path)


def _fx_fuse(model: nn.Module, x: torch.Tensor, tmp: Path) -> Callable:
    from torch.fx.experimental.optimization import fuse

    fused = fuse(model)
    bn_before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # A BN carrying an attached SE block is not taken for a plain BatchNorm: it stays, SE and all.
    plain = [pair for pair in _conv_bn_pairs(model) if not attached_hooks(model.get_submodule(pair[1]))]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == bn_before - len(plain)
    return fused


def _conv_bn_pairs(model: nn.Module) -> list[list[str]]:
    """Every conv child followed by a BN child, by name: what a user hands to fuse_modules."""
    pairs = []
    for path, m in model.named_modules():
        children = list(m.named_children())
        for (a, conv), (b, bn) in zip(children, children[1:], strict=False):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                pairs.append([f"{path}.{a}" if path else a, f"{path}.{b}" if path else b])
    return pairs


def _fuse_modules(model: nn.Module, x: torch.Tensor, tmp: Path) -> Callable:
    from torch.ao.quantization import fuse_modules

    # A BN carrying an attached SE block is refused by fuse_modules (test_attach.py); the rest fuse.
    pairs = [pair for pair in _conv_bn_pairs(model) if not attached_hooks(model.get_submodule(pair[1]))]
    fused = fuse_modules(model, pairs)  # on a copy
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == (
        sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - len(pairs)
    )
    return copy.deepcopy(fused)  # what a copy of the fused model computes, too


def _pt2e_int8(model: nn.Module, x: torch.Tensor, tmp: Path) -> Callable:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, (x,), dynamic_shapes=_batch()).module(), quantizer)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(x.shape, generator=gen))
        prepared(x)
    converted = convert_pt2e(prepared)
    targets = {str(n.target) for n in converted.graph.nodes}
    assert any("quantize_per_tensor" in t for t in targets), "nothing was quantized"
    return converted


#: way out -> (how it is made, nets it runs on, what the test checks; the README shows the last).
WAYS: dict[str, tuple[Callable, tuple[str, ...], str]] = {
    "`torch.jit.trace`, grad mode on": (
        _jit_trace, HAND_MADE, "its own `check_trace` (a retrace gives the same graph); outputs at batch 2 and 3",
    ),
    "`torch.jit.script`": (_jit_script, ("rebuilt-residual",), "scripted, saved, loaded; outputs at batch 2 and 3 "
                           "(rebuilt blocks only: with attached SE blocks it refuses, naming `torch.export`)"),
    "`torch.save(model)`, `torch.load(weights_only=False)`": (
        _pickled, (*HAND_MADE, "torchvision-resnet18", "root-residual", "rebuilt-residual"),
        "whole-model pickle: same classes and state_dict keys after loading; outputs at batch 2 and 3",
    ),
    "ONNX, `dynamo=False`, in onnxruntime": (
        _onnx_legacy, HAND_MADE, "exported with grad mode on and a dynamic batch axis; onnxruntime outputs",
    ),
    "ONNX, `dynamo=True`, in onnxruntime": (
        _onnx_dynamo, HAND_MADE, "exported with a dynamic batch dim; onnxruntime outputs",
    ),
    "`torch.export`, dynamic batch, `.pt2` save/load": (
        _export, HAND_MADE, "exported, saved, loaded; outputs at batch 2 and 3",
    ),
    "AOTInductor (`aoti_compile_and_package`), CPU": (
        _aoti, ("channels-last",), "packaged, loaded with `aoti_load_package`, run at batch 2 and 3 (one net: C++ compile)",
    ),
    "Conv-BN folding, `torch.fx.experimental.optimization.fuse`": (
        _fx_fuse, (*HAND_MADE, "torchvision-resnet18", "rebuilt-residual"), "every conv->BN pair folded (BN count "
        "drops by the pairs) but a BN carrying an attached SE block, which stays; outputs",
    ),
    "Conv-BN folding, `torch.ao.quantization.fuse_modules`": (
        _fuse_modules, ("residual", "inception", "dense", "torchvision-resnet18", "rebuilt-residual"),
        "every conv->BN pair fused by name but a BN carrying an attached SE block (refused loudly, "
        "tests/test_attach.py); outputs of the fused model and of its copy",
    ),
    "PT2E int8, `X86InductorQuantizer` (torchao)": (
        _pt2e_int8, ("residual", "channels-last"), f"export -> prepare -> calibrate -> convert; quantize nodes present, "
        f"relative L2 error < {INT8_REL_ERROR}",
    ),
}
INT8_WAYS = {"PT2E int8, `X86InductorQuantizer` (torchao)"}


def _measure(way: str, net: str, tmp: Path) -> str:
    """'works' or the first line of what went wrong."""
    make, _, _ = WAYS[way]
    model = _injected(net)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    try:
        artifact = make(model, x, tmp)
        for inp in (x, torch.randn(3, 3, 32, 32, generator=gen)):
            with torch.no_grad():
                got, want = artifact(inp), model(inp)
            if way in INT8_WAYS:
                error = ((got - want).norm() / want.norm()).item()
                if not error < INT8_REL_ERROR:
                    return f"relative error {error:.3g}"
            else:
                diff = (got - want).abs().max().item()
                if not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
                    return f"outputs differ by {diff:.3g}"
    except Exception as e:  # the status is the measurement; the per-way test shows the failure
        return f"fails: {type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
    return "works"


class _Measurements(dict):
    """(way, net) -> status, measured on first use, so one selected test measures only its own."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        super().__init__()
        self._tmp = tmp

    def __missing__(self, key: tuple[str, str]) -> str:
        self[key] = _measure(*key, self._tmp.mktemp("deploy"))
        return self[key]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    return _Measurements(tmp_path_factory)


@pytest.mark.parametrize(
    ("way", "net"), [(w, n) for w, (_, nets, _) in WAYS.items() for n in nets], ids=lambda v: re.sub(r"\W+", "-", v)
)
def test_way_out_matches_eager(measured: dict[tuple[str, str], str], way: str, net: str) -> None:
    assert measured[way, net] == "works"


def _status(measured: dict[tuple[str, str], str], way: str) -> str:
    nets = WAYS[way][1]
    failing = [f"{net}: {measured[way, net]}" for net in nets if measured[way, net] != "works"]
    if not failing:
        return f"works: {', '.join(nets)}"
    return f"does not work ({'; '.join(failing)})"


def deploy_table(measured: dict[tuple[str, str], str]) -> str:
    """The README's Deploy table, from the measurements."""
    rows = ["| way out | status | what the test checks |", "|---|---|---|"]
    rows += [f"| {way} | {_status(measured, way)} | {checks} |" for way, (_, _, checks) in WAYS.items()]
    return "\n".join(rows)


def test_readme_deploy_table_is_what_was_measured(measured: dict[tuple[str, str], str]) -> None:
    text = README.read_text()
    section = text.split("## Deploy", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == deploy_table(measured), "README's Deploy table is stale; it should read:\n" + deploy_table(measured)


# --------------------------------------------------------------------------------------------
# deploy-time methods of the original block, called through the rebuilt block


class _Fusable(nn.Module):
    """A residual block with its own deploy method that swaps layers (conv+BN -> conv, Identity)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    def fuse(self) -> _Fusable:
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.conv1, self.bn1 = fuse_conv_bn_eval(self.conv1, self.bn1), nn.Identity()
        self.conv2, self.bn2 = fuse_conv_bn_eval(self.conv2, self.bn2), nn.Identity()
        return self


class _Reparameterizable(nn.Module):
    """A residual block whose ``reparameterize`` replaces its branch by one layer and drops the
    branch's layers (as RepVGG/MobileOne blocks do): the site inside it disappears."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.fused: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return x + self.fused(x)
        return x + self.b(torch.relu(self.a(x)))

    def reparameterize(self) -> None:
        self.fused = nn.Conv2d(self.a.in_channels, self.a.out_channels, 3, padding=1)
        del self.a, self.b


def _with_blocks(monkeypatch: pytest.MonkeyPatch | None = None) -> nn.Module:
    """The two blocks injected; with ``monkeypatch``, rebuilt (else attached)."""
    if monkeypatch is not None:
        force_rebuild(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Fusable(8), _Reparameterizable(8)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return _gates_away_from_one(inject_se(model))


def test_a_method_that_swaps_layers_is_followed_by_the_attached_block() -> None:
    model = _with_blocks()
    block = model[1]
    se = block.se
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        block.fuse()  # bn2 becomes an Identity: the SE hook moves to what is there now
        torch.testing.assert_close(model(x), want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(copy.deepcopy(model)(x), want, atol=ATOL, rtol=RTOL)
    assert block.se is se and attached_hooks(block.bn2)
    assert not attached_hooks(remove_se(model)[1].bn2)


def test_a_method_that_removes_an_attached_site_makes_the_block_refuse_to_run() -> None:
    model = _with_blocks()
    x = torch.randn(2, 3, 16, 16)
    model[2].reparameterize()  # deletes the branch the SE block was attached to
    for runnable in (model, copy.deepcopy(model)):
        with pytest.raises(PlanMismatchError, match=r"_Reparameterizable no longer has 'b'.*remove_se"):
            runnable(x)
    restored = remove_se(model)
    assert not hasattr(restored[2], "se") and restored[2](torch.randn(2, 8, 16, 16)).shape == (2, 8, 16, 16)


def test_a_method_that_swaps_layers_is_followed_by_the_rebuilt_block(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _with_blocks(monkeypatch)
    block = model[1]
    se = block.se
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        assert block.fuse() is block.original
    assert isinstance(block.conv1, nn.Conv2d) and isinstance(block.bn1, nn.Identity)
    assert block.se is se  # the trained SE block is kept, not re-created
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(copy.deepcopy(model)(x), want, atol=ATOL, rtol=RTOL)
    assert isinstance(remove_se(model)[1].bn1, nn.Identity)  # the fused original comes back


def test_a_method_that_removes_the_site_makes_the_block_refuse_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _with_blocks(monkeypatch)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(PlanMismatchError, match=r"_Reparameterizable\.reparameterize\(\) changed the block at 2.*remove_se"):
        model[2].reparameterize()
    for runnable in (model, copy.deepcopy(model)):
        with pytest.raises(PlanMismatchError, match="refuses to run"):
            runnable(x)
    restored = remove_se(model)
    assert isinstance(restored[2], _Reparameterizable) and restored[2].fused is not None
    assert restored(x).shape == (2, 8, 16, 16)


def test_a_layer_set_on_the_rebuilt_block_is_set_on_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _with_blocks(monkeypatch)
    block = model[1]
    block.bn1 = nn.Identity()
    assert block.original.bn1 is block.bn1
    del block.bn2
    assert not hasattr(block.original, "bn2")


def test_one_traced_graph_in_every_grad_mode() -> None:
    model = _injected("residual")
    x = torch.randn(2, 3, 32, 32)
    with_grad = [n.kind() for n in torch.jit.trace(model, x).inlined_graph.nodes()]
    with torch.no_grad():
        without_grad = [n.kind() for n in torch.jit.trace(model, x).inlined_graph.nodes()]
    assert with_grad == without_grad
    assert with_grad.count("aten::mean") == SITES["residual"] and "aten::addmm" not in with_grad


@pytest.mark.parametrize("net", HAND_MADE)
def test_the_perturbed_gates_matter(net: str) -> None:
    # A way out that dropped or bypassed the SE blocks would be off by far more than ATOL.
    model = _injected(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with_se = model(x)
        without = remove_se(copy.deepcopy(model))(x)
    assert (with_se - without).abs().max() > 1000 * ATOL


def test_a_block_with_an_optional_argument_fixed_by_tracing_exports_but_does_not_script(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The README's TorchScript caveat: fx guards the fixed argument with an assertion on an
    # ``object``, which TorchScript cannot compile; torch.export takes the same model.
    force_rebuild(monkeypatch)
    model = _gates_away_from_one(inject_se(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), OptionalArg(8)).eval()))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(RuntimeError, match="object"):
        torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x), atol=ATOL, rtol=RTOL)


def test_scripting_a_model_with_attached_blocks_says_what_to_use() -> None:
    model = _injected("residual")
    with pytest.raises(AttributeError, match="TorchScript cannot compile; use torch.export or torch.jit.trace"):
        torch.jit.script(model)


@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize(("shape", "axis"), [((2, 16, 5, 6), 1), ((2, 5, 6, 16), -1), ((2, 16, 7), 1)])
def test_every_gate_and_pool_scripts_to_the_eager_block(gate: str, pool: str, shape: tuple[int, ...], axis: int) -> None:
    # TorchScript takes the module path, which names gates and pools itself: it must cover them all.
    block = _gates_away_from_one(SEBlock(16, 4, channel_axis=axis, gate=gate, pool=pool, identity_init=False))
    x = torch.randn(shape)
    torch.testing.assert_close(torch.jit.script(block)(x), block(x), atol=ATOL, rtol=RTOL)
