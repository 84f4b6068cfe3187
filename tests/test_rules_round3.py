"""Placement rules, round 3 (issue 17): conditioned residuals (a second model input joins the
branch), multi-branch residuals (PolyNet, ``x + a(x) + b(x)``), and the post-build check that
refuses a rebuilt block computing something else than its original (dual-path blocks passing
lists; blocks passing tuples are rebuilt per element, see test_tuple_blocks.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from nets import conv_bn, conv_bn_relu, force_rebuild
from torch import nn

from se_inject import SEBlock, SkipReason, find_sites, inject_se
from se_inject.errors import PlanMismatchError, UnfaithfulRebuildError

X = torch.randn(2, 3, 16, 16)
T = torch.randn(2, 16)


class CondResBlock(nn.Module):
    """A diffusion U-Net ResNet block: ``x + conv2(act(conv1(x) + emb(t)))``."""

    def __init__(self, c: int = 8, e: int = 16) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.emb, self.act = nn.Linear(e, c), nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x) + self.emb(t)[:, :, None, None]))


class CondNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b1, self.b2 = nn.Conv2d(3, 8, 3, padding=1), CondResBlock(), CondResBlock()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.b2(self.b1(self.stem(x), t), t)


class TwoInputSum(nn.Module):
    """A real fusion: two operands of different model inputs, neither reading the other's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Sequential(conv_bn_relu(3, 8), conv_bn(8, 8)), nn.Sequential(conv_bn_relu(3, 8), conv_bn(8, 8))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


class MultiBranch(nn.Module):
    """PolyNet-style ``out = x + s*a(x); out = out + s*b(x)`` (``scale=None``: ``x + a(x) + b(x)``),
    with ``ways`` branches; branch ``b`` is an Inception-like concatenation."""

    def __init__(self, c: int = 8, ways: int = 2, scale: float | None = 0.3) -> None:
        super().__init__()
        self.scale = scale
        self.branches = nn.ModuleList(nn.Sequential(conv_bn_relu(c, c), conv_bn(c, c)) for _ in range(ways - 1))
        self.left, self.right = conv_bn_relu(c, c // 2), conv_bn_relu(c, c // 2)
        self.fuse = conv_bn(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for branch in self.branches:
            out = out + (self.scale * branch(x) if self.scale is not None else branch(x))
        inception = self.fuse(torch.cat([self.left(x), self.right(x)], 1))
        out = out + (self.scale * inception if self.scale is not None else inception)
        return torch.relu(out)


def _exact(model: nn.Module, *inputs: torch.Tensor) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Inject; check the plan is what is built, outputs are bit-exact, and return each SE
    block's input."""
    model.eval()
    example = inputs if len(inputs) > 1 else inputs[0]
    plan = find_sites(model, example_input=example)
    with torch.no_grad():
        before = model(*inputs)
        injected = inject_se(model, example_input=example)
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            m.register_forward_hook(lambda mod, a, o, name=name: seen.__setitem__(name, a[0]))
            for name, m in injected.named_modules()
            if isinstance(m, SEBlock)
        ]
        after = injected(*inputs)
    for h in hooks:
        h.remove()
    assert sorted(seen) == sorted(s.name for s in plan.sites)  # a plan is a promise
    assert torch.equal(before, after)
    return injected, seen


def _outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...], *paths: str) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: got.__setitem__(p, o)) for p in paths]
    with torch.no_grad():
        model.eval()(*inputs)
    for h in hooks:
        h.remove()
    return got


def test_a_second_input_joining_the_branch_keeps_the_residual() -> None:
    model = CondNet()
    plan = find_sites(model, example_input=(X, T))
    assert [(s.name, str(s.kind), s.source, s.targets) for s in plan.sites] == [
        ("b1.se", "residual", "b1.conv2", ("b1.add_1",)), ("b2.se", "residual", "b2.conv2", ("b2.add_1",))
    ]
    assert plan.skipped == ()
    branches = _outputs(model, (X, T), "b1.conv2", "b2.conv2")
    _, seen = _exact(model, X, T)
    assert torch.equal(seen["b1.se"], branches["b1.conv2"]) and torch.equal(seen["b2.se"], branches["b2.conv2"])


def test_two_operands_of_different_inputs_stay_a_fusion() -> None:
    plan = find_sites(TwoInputSum(), example_input=(X, X))
    assert plan.sites == () and [(s.node, s.reason) for s in plan.skipped] == [("add", SkipReason.FUSION)]


@pytest.mark.parametrize("ways", [2, 3])
@pytest.mark.parametrize("scale", [0.3, None])
def test_every_branch_summed_into_the_block_input_is_a_residual_branch(ways: int, scale: float | None) -> None:
    model = nn.Sequential(conv_bn(3, 8), MultiBranch(8, ways, scale))
    plan = find_sites(model)
    first = [f"1.branches.{i}" for i in range(ways - 1)]
    assert [(str(s.kind), s.owner, s.source) for s in plan.sites] == [
        *(("residual", "1", f) for f in first), ("residual", "1", "1.fuse")
    ]
    # One placement per block: the concatenation inside the last branch is nested, not Inception.
    assert [(s.node, s.reason) for s in plan.skipped] == [("1.cat", SkipReason.NESTED)]
    branches = _outputs(model, (X,), *first, "1.fuse")
    _, seen = _exact(model, X)
    for site in plan.sites:
        assert torch.equal(seen[site.name], branches[site.source])


class DualPathBlock(nn.Module):
    """DPN-style block taking and returning ``[residual, dense]`` lists (DenseNet-style list
    passing, which is not rebuilt per element)."""

    def __init__(self, cin: int, r: int, d: int, first: bool = False) -> None:
        super().__init__()
        self.r = r
        self.proj = conv_bn(cin, r + d) if first else None
        self.body = nn.Sequential(conv_bn_relu(cin, 8), conv_bn(8, r + d))

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        x_in = torch.cat(x, 1) if isinstance(x, list) else x
        if self.proj is not None:
            s = self.proj(x_in)
            s1, s2 = s[:, : self.r], s[:, self.r :]
        else:
            s1, s2 = x[0], x[1]
        y = self.body(x_in)
        return [s1 + y[:, : self.r], torch.cat([s2, y[:, self.r :]], 1)]


class CatAct(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(x, list):
            x = torch.cat(x, 1)
        return torch.relu(self.bn(x))


def _dual_path_net() -> nn.Module:
    return nn.Sequential(
        conv_bn(3, 8),
        nn.Sequential(DualPathBlock(8, 8, 4, True), DualPathBlock(16, 8, 4)),
        nn.Sequential(DualPathBlock(20, 8, 4, True), DualPathBlock(16, 8, 4)),
        CatAct(20),
    ).eval()


def test_a_rebuild_that_tracing_specialised_is_refused_and_the_model_is_unchanged() -> None:
    # Blocks pass [residual, dense] lists: their sites are owned by a stage (a block called
    # with a list is not its own owner), and the stage rebuilt from its own trace loses the
    # isinstance branch. The post-build check names the owner and nothing is swapped in.
    model = _dual_path_net()
    modules = dict(model.named_modules())
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(X)
    with pytest.raises(UnfaithfulRebuildError) as info:
        inject_se(model, example_input=X)
    assert isinstance(info.value, PlanMismatchError) and info.value.owner in {s.owner for s in find_sites(model).sites}
    assert info.value.owner in str(info.value)
    assert dict(model.named_modules()) == modules and not any(isinstance(m, SEBlock) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(X), before)


def test_a_deliberately_unfaithful_rebuild_is_named_by_owner(monkeypatch) -> None:
    # A rebuild whose graph computes something else (one op changed) must not be installed.
    import se_inject.inject.rebuilt as rebuilt

    real = rebuilt._insert_sites

    def corrupt(graphs, owner_path, sites):
        real(graphs, owner_path, sites)
        graph = graphs[False]  # the eval graph, which the check runs
        if owner_path == "2":
            out = next(n for n in graph.nodes if n.op == "output")
            with graph.inserting_before(out):
                doubled = graph.call_function(torch.mul, (out.args[0], 2.0))
            out.args = (doubled,)

    monkeypatch.setattr(rebuilt, "_insert_sites", corrupt)
    force_rebuild(monkeypatch)  # its branches end in modules: attached, nothing to check
    model = nn.Sequential(conv_bn(3, 8), MultiBranch(8, 2), MultiBranch(8, 2)).eval()
    with pytest.raises(UnfaithfulRebuildError, match="rebuilt 2 ") as info:
        inject_se(model, example_input=X)
    assert info.value.owner == "2"
    assert not any(isinstance(m, SEBlock) for m in model.modules())
    assert type(model[1]) is MultiBranch and type(model[2]) is MultiBranch


def test_the_check_passes_for_any_gate_and_keeps_the_modes() -> None:
    # SE blocks pass their input through during the check: a paper gate (not identity) builds.
    model = nn.Sequential(conv_bn(3, 8), MultiBranch(8, 3)).train()
    injected = inject_se(model, gate="sigmoid", identity_init=False, example_input=X)
    assert sum(isinstance(m, SEBlock) for m in injected.modules()) == 3
    assert all(m.training for m in injected.modules())
