"""Property-based: random small networks, known site counts, bit-exact identity, branch side."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nets import Dense, Inception, Residual, conv_bn
from torch import nn

from se_inject import SEBlock, find_sites, inject_se
from se_inject.inject.attach import attached_hooks
from se_inject.inject.rebuilt import RebuiltBlock

residual = st.builds(
    lambda spelling, project, ls, scale, drop: ("residual", dict(spelling=spelling, project=project, layer_scale=ls, scale=scale, dropout=drop)),
    st.sampled_from(["+", "+=", "torch.add", "add_"]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, 0.5]),
    st.booleans(),
)
inception = st.builds(lambda n, pool: ("inception", dict(branches=n, pool=pool)), st.integers(2, 4), st.booleans())
dense = st.builds(lambda n: ("dense", dict(layers=n)), st.integers(1, 3))
plain = st.just(("plain", {}))
blocks = st.lists(st.one_of(residual, inception, dense, plain), min_size=1, max_size=5)


def _build(spec: list[tuple[str, dict]]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = [conv_bn(3, 8)]
    channels, expected = 8, 0
    for kind, kw in spec:
        if kind == "residual":
            out = channels + 4 if kw["project"] else channels
            layers.append(
                Residual(channels, out, spelling=kw["spelling"], layer_scale=kw["layer_scale"], scale=kw["scale"], dropout=kw["dropout"])
            )
            channels, expected = out, expected + 1
        elif kind == "inception":
            widths = tuple(4 + i for i in range(kw["branches"]))
            layers.append(Inception(channels, widths, pool_branch=kw["pool"]))
            channels, expected = sum(widths) + (channels if kw["pool"] else 0), expected + 1
        elif kind == "dense":
            layers.append(Dense(channels, 3, kw["layers"]))
            channels, expected = channels + 3 * kw["layers"], expected + kw["layers"]
        else:
            layers.append(nn.Sequential(conv_bn(channels, channels), nn.ReLU()))
    return nn.Sequential(*layers), expected


def _se_inputs(block: nn.Module) -> list[object]:
    """What each SE block of ``block`` scales: the module it is attached to (by path, ``""`` for
    the block's own output), or for a rebuilt block the graph node it reads (its target)."""
    if isinstance(block, RebuiltBlock):
        return [n.args[0].target for n in block.graph.nodes
                if n.op == "call_module" and isinstance(block.get_submodule(n.target), SEBlock)]
    found = []
    for path, module in block.named_modules():
        for _, hook in attached_hooks(module):
            assert any(se is hook.se for se in block.children())  # registered on the owner
            found.append(torch.cat if module is block else path)
    return found


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=blocks, seed=st.integers(0, 2**16))
def test_random_networks(spec: list[tuple[str, dict]], seed: int) -> None:
    torch.manual_seed(seed)
    model, expected = _build(spec)
    model.eval()
    plan = find_sites(model)
    assert len(plan.sites) == expected, plan
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        injected = inject_se(model)
        after = injected(x)
    assert torch.equal(before, after)
    assert sum(isinstance(m, SEBlock) for m in injected.modules()) == expected
    for (kind, _), block in zip(spec, list(injected)[1:], strict=True):
        if kind == "residual":
            # The SE block squeezes the branch's output; the trunk (x or the projection) is untouched.
            (source,) = _se_inputs(block)
            assert source == "branch"
        elif kind == "inception":
            (source,) = _se_inputs(block)
            assert source is torch.cat  # after the concatenation: the block's own output
        elif kind == "dense":
            sources = _se_inputs(block)
            assert sources == [f"layers.{i}" for i in range(len(sources))]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=blocks)
def test_second_injection_adds_nothing(spec: list[tuple[str, dict]]) -> None:
    model, expected = _build(spec)
    inject_se(model.eval())
    again = find_sites(model)
    assert again.sites == ()
    assert len([s for s in again.skipped if s.reason == "already-attended"]) == expected
