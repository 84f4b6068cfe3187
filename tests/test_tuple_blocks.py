"""Blocks called with a tuple of tensors (issue 17, pattern 3): DPN's dual-path blocks take and
return ``(residual, dense)`` and open with ``if isinstance(x, tuple): x = torch.cat(x, 1)``;
Twins' position encoder takes ``(x, (H, W))`` with sizes read from the input. Each such block is
its own owner, traced with one placeholder per element of the tuple, so its rebuilt forward
keeps the tuple branch. Blocks passing lists keep the stage-level refusal (test_rules_round3)."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from nets import conv_bn, conv_bn_relu, perturb_se
from timm.models.dpn import DualPathBlock as TimmDualPathBlock
from torch import nn

from se_inject import SEBlock, SiteKind, SkipReason, apply_plan, find_sites, inject_se, load, save
from se_inject.plan import Plan

X = torch.randn(2, 3, 16, 16)


class DualPathBlock(nn.Module):
    """A DPN block as timm wrote it while blocks passed tuples: ``x`` (first block) or a
    ``(residual, dense)`` tuple in, the tuple out. A stage's first block projects its input
    into both paths; ``b`` (DPN-b) computes the residual and the new dense features with two
    convolutions instead of slicing one."""

    def __init__(self, cin: int, r: int, inc: int, *, first: bool = False, stride: int = 1, b: bool = False) -> None:
        super().__init__()
        self.r = r
        self.proj = conv_bn(cin, r + 2 * inc, 1, stride) if first else None
        self.a = conv_bn_relu(cin, 8, 1)
        self.b3 = conv_bn_relu(8, 8, 3, stride)
        if b:
            self.c: nn.Module = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())
            self.c1: nn.Module | None = nn.Conv2d(8, r, 1, bias=False)
            self.c2: nn.Module | None = nn.Conv2d(8, inc, 1, bias=False)
        else:
            self.c, self.c1, self.c2 = conv_bn(8, r + inc, 1), None, None

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = torch.cat(x, 1) if isinstance(x, tuple) else x
        if self.proj is None:
            s1, s2 = x[0], x[1]
        else:
            s = self.proj(x_in)
            s1, s2 = s[:, : self.r], s[:, self.r :]
        y = self.c(self.b3(self.a(x_in)))
        if self.c1 is not None and self.c2 is not None:
            out1, out2 = self.c1(y), self.c2(y)
        else:
            out1, out2 = y[:, : self.r], y[:, self.r :]
        return s1 + out1, torch.cat([s2, out2], 1)


class CatBnAct(nn.Module):
    """DPN's last layer: joins the two paths."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, tuple):
            x = torch.cat(x, 1)
        return torch.relu(self.bn(x))


def dual_path_net(b: bool = False) -> nn.Module:
    """Stem, two stages of two dual-path blocks (residual width 8, 4 new dense channels per
    block), the joining layer: ``1.0`` is called with a tensor, the other blocks with tuples."""
    r, inc = 8, 4
    return nn.Sequential(
        conv_bn(3, 8),
        nn.Sequential(
            DualPathBlock(8, r, inc, first=True, b=b), DualPathBlock(r + 3 * inc, r, inc, b=b)
        ),
        nn.Sequential(
            DualPathBlock(r + 4 * inc, r, inc, first=True, stride=2, b=b), DualPathBlock(r + 3 * inc, r, inc, b=b)
        ),
        CatBnAct(r + 4 * inc),
    ).eval()


BLOCKS = ("1.0", "1.1", "2.0", "2.1")


def _se_inputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's output and the input each SE block received."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, name=name: seen.__setitem__(name, a[0]))
        for name, m in model.named_modules()
        if isinstance(m, SEBlock)
    ]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return out, seen


def _outputs(model: nn.Module, x: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: got.__setitem__(p, o)) for p in paths]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


def test_each_block_called_with_a_tuple_owns_its_residual_site() -> None:
    plan = find_sites(dual_path_net(), example_input=X)
    assert [s.name for s in plan.sites] == [f"{b}.se" for b in BLOCKS]
    assert all(s.kind is SiteKind.RESIDUAL for s in plan.sites)
    assert [s.owner for s in plan.sites] == list(BLOCKS)
    # The body's output, before it is split into the residual and the dense part.
    assert [s.source for s in plan.sites] == [f"{b}.c" for b in BLOCKS]
    # 1.0 takes the stem's tensor; the others take the (residual, dense) pair.
    assert [(s.owner_args, s.owner_inputs) for s in plan.sites] == [(1, 0), (1, 2), (1, 2), (1, 2)]
    # The dense path's concatenations join carried features (an earlier block's dense output,
    # the projection's other slice) and the body's new slice, scaled by the residual site: no
    # Inception site and nothing left unrewritable.
    assert {s.reason for s in plan.skipped} == {SkipReason.NESTED, SkipReason.NO_COMPUTED_BRANCH}
    assert plan.unanalysed == ()


def test_injection_is_bit_exact_and_builds_the_plan() -> None:
    model = dual_path_net()
    plan = find_sites(model, example_input=X)
    branches = _outputs(model, X, [f"{b}.c" for b in BLOCKS])
    with torch.no_grad():
        before = model(X)
    injected = inject_se(copy.deepcopy(model), example_input=X)
    after, seen = _se_inputs(injected, X)
    assert torch.equal(before, after)
    assert sorted(seen) == sorted(s.name for s in plan.sites)  # a plan is a promise
    for site in plan.sites:
        assert torch.equal(seen[site.name], branches[site.source])
    # The rebuilt blocks still take the tuple: not specialised to the analysis input's size.
    bigger = torch.randn(1, 3, 24, 20)
    with torch.no_grad():
        assert torch.equal(injected(bigger), model(bigger))


def test_train_mode_copies_and_pickles_keep_the_tuple_forward() -> None:
    model = dual_path_net()
    injected = inject_se(copy.deepcopy(model), example_input=X)
    model.train()
    injected.train()
    torch.manual_seed(0)
    assert torch.equal(model(X), injected(X))  # batch statistics, same running-stat updates
    model.eval()
    injected.eval()
    with torch.no_grad():
        expected = model(X)
        assert torch.equal(copy.deepcopy(injected)(X), expected)
        assert torch.equal(pickle.loads(pickle.dumps(injected))(X), expected)


def test_dpn_b_gets_a_residual_and_a_dense_site_per_block() -> None:
    # DPN-b computes the residual (c1) and the new dense channels (c2) with separate layers:
    # rule 9's ``cat([shortcut + branch, new])`` in every block.
    model = dual_path_net(b=True)
    plan = find_sites(model, example_input=X)
    got = sorted((s.owner, str(s.kind), s.source) for s in plan.sites)
    assert got == sorted(
        [(b, "residual", f"{b}.c1") for b in BLOCKS] + [(b, "dense", f"{b}.c2") for b in BLOCKS]
    )
    with torch.no_grad():
        before = model(X)
    injected = inject_se(copy.deepcopy(model), example_input=X)
    after, seen = _se_inputs(injected, X)
    assert torch.equal(before, after) and sorted(seen) == sorted(s.name for s in plan.sites)


def test_the_plan_round_trips_and_replays(tmp_path) -> None:
    model = dual_path_net()
    plan = find_sites(model, example_input=X)
    data = plan.to_dict()
    assert [s["owner_inputs"] for s in data["sites"]] == [s.owner_inputs for s in plan.sites]
    again = Plan.from_dict(data)
    assert again == plan
    # Plans saved before the field existed read as blocks taking tensors.
    old = copy.deepcopy(data)
    for s in old["sites"]:
        del s["owner_inputs"]
    assert {s.owner_inputs for s in Plan.from_dict(old).sites} == {0}
    with torch.no_grad():
        before = model(X)
        replayed = apply_plan(copy.deepcopy(model), again)
        assert torch.equal(replayed(X), before)
    assert sorted(n for n, m in replayed.named_modules() if isinstance(m, SEBlock)) == sorted(s.name for s in plan.sites)
    # A checkpoint of the injected model loads onto a fresh base with the same outputs.
    injected = inject_se(copy.deepcopy(model), example_input=X)
    perturb_se(injected)
    path = save(injected, tmp_path / "dpn.pt")
    loaded = load(path, base_model=copy.deepcopy(model)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), injected.eval()(X))
        assert not torch.equal(loaded(X), before)  # the SE weights came with it



class PosConv(nn.Module):
    """Twins' position encoder: tokens and their ``(H, W)``, a depthwise conv on the map plus
    the map itself, back to tokens."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        feat = x.transpose(1, 2).reshape(b, c, *size)
        return (self.proj(feat) + feat).flatten(2).transpose(1, 2)


class TokenStage(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, 4)
        self.pos = PosConv(c)
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        size = (x.shape[2], x.shape[3])  # traced: (H, W) follow the input
        return self.norm(self.pos(x.flatten(2).transpose(1, 2), size))


@pytest.mark.parametrize("shape", [(1, 3, 32, 24), (2, 3, 16, 16)])
def test_a_block_called_with_a_traced_size_tuple_is_rebuilt_for_any_size(shape: tuple[int, ...]) -> None:
    model = TokenStage().eval()
    plan = find_sites(model, example_input=X)
    assert [(s.name, s.owner, s.source, s.owner_args, s.owner_inputs) for s in plan.sites] == [
        ("pos.se", "pos", "pos.proj", 2, 2)
    ]
    injected = inject_se(copy.deepcopy(model), example_input=X)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(injected(x), model(x))
    assert sum(isinstance(m, SEBlock) for m in injected.modules()) == 1


class TimmTupleDualPathBlock(TimmDualPathBlock):
    """timm's DPN block with the forward it had while DPN passed ``(resid, dense)`` tuples
    (same layers, same function: today's block takes and returns the two concatenated)."""

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = torch.cat(x, dim=1) if isinstance(x, tuple) else x
        if self.c1x1_w_s1 is None and self.c1x1_w_s2 is None:
            x_s1, x_s2 = x[0], x[1]
        else:
            x_s = self.c1x1_w_s1(x_in) if self.c1x1_w_s1 is not None else self.c1x1_w_s2(x_in)
            x_s1, x_s2 = x_s[:, : self.num_1x1_c], x_s[:, self.num_1x1_c :]
        x_in = self.c1x1_c(self.c3x3_b(self.c1x1_a(x_in)))
        if self.c1x1_c1 is not None and self.c1x1_c2 is not None:
            out1, out2 = self.c1x1_c1(x_in), self.c1x1_c2(x_in)
        else:
            out1, out2 = x_in[:, : self.num_1x1_c], x_in[:, self.num_1x1_c :]
        return x_s1 + out1, torch.cat([x_s2, out2], dim=1)


class JoinPaths(nn.Module):
    """Concatenates the two paths before DPN's last norm and activation."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.inner(torch.cat(x, 1) if isinstance(x, tuple) else x)


def _tuple_dpn(name: str) -> tuple[nn.Module, nn.Module]:
    """A timm DPN and the same model passing tuples between its blocks."""
    reference = timm.create_model(name).eval()
    model = copy.deepcopy(reference)
    for block in model.modules():
        if type(block) is TimmDualPathBlock:
            block.__class__ = TimmTupleDualPathBlock
    model.features.conv5_bn_ac = JoinPaths(model.features.conv5_bn_ac)
    return reference, model


@pytest.mark.parametrize("name", ["dpn68", "dpn48b"])
def test_timm_dpn_passing_tuples_gets_a_site_per_block(name: str) -> None:
    reference, model = _tuple_dpn(name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = reference(x)
        assert torch.equal(model(x), before)
    plan = find_sites(model, example_input=x)
    blocks = [p for p, m in model.named_modules() if isinstance(m, TimmDualPathBlock)]
    b = model.b  # DPN-b: the residual and the new dense channels from two convolutions
    expected = [(p, "residual", f"{p}.c1x1_c1" if b else f"{p}.c1x1_c") for p in blocks]
    expected += [(p, "dense", f"{p}.c1x1_c2") for p in blocks] if b else []
    assert sorted((s.owner, str(s.kind), s.source) for s in plan.sites) == sorted(expected)
    # The first block takes the stem's tensor, every later one the (residual, dense) pair.
    assert {s.owner: s.owner_inputs for s in plan.sites} == {p: 0 if i == 0 else 2 for i, p in enumerate(blocks)}
    injected = inject_se(model, example_input=x)
    after, seen = _se_inputs(injected, x)
    assert torch.equal(after, before) and sorted(seen) == sorted(s.name for s in plan.sites)
    other = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        assert torch.equal(injected(other), reference(other))
