"""Channel axes of opaque calls (placement rules 4 and 13): a part that does not trace stays one
call in its parent's graph, and the channel axis of what it returns comes from its own layers,
found by a meta forward; a layout those layers do not tell stays unknown."""

from __future__ import annotations

import pytest
import torch
from nets import OpaqueAmbiguous, OpaqueNet, SamePaddedConv
from torch import nn

from se_inject import SEBlock, SkipReason, find_sites, inject_se


def _inject_and_watch(model: nn.Module, x: torch.Tensor, branches: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inject SE into ``model`` (asserting bit-exact outputs and the class kept); return the
    input of each SE block and the output of each branch end, on ``x``."""
    model.eval()
    cls = type(model)
    with torch.no_grad():
        before = model(x)
        inject_se(model, example_input=x)
        seen: dict[str, torch.Tensor] = {}
        ends: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, a[0])) for n, m in model.named_modules() if isinstance(m, SEBlock)]
        hooks += [model.get_submodule(p).register_forward_hook(lambda mod, a, o, p=p: ends.__setitem__(p, o)) for p in branches]
        after = model(x)
    for h in hooks:
        h.remove()
    out_before = before if isinstance(before, torch.Tensor) else before.last_hidden_state
    out_after = after if isinstance(after, torch.Tensor) else after.last_hidden_state
    assert torch.equal(out_before, out_after)
    assert type(model) is cls
    return seen, ends


def test_residuals_of_opaque_calls_get_se_on_the_branch() -> None:
    # 16 channels at 16x16: sizes alone could not tell axis 1 from axes 2 and 3.
    model, x = OpaqueNet(16), torch.randn(2, 3, 32, 32)
    plan = find_sites(model, example_input=x)
    assert [(s.kind, s.channels, s.channel_axis) for s in plan.sites] == [("residual", 16, 1)] * 2
    assert not plan.skipped
    assert {"stem", "blocks.0.reduce", "blocks.1.expand"} <= {u.path for u in plan.unanalysed}  # they did not trace
    seen, ends = _inject_and_watch(model, x, ["blocks.0.reduce", "blocks.1.reduce"])
    assert len(seen) == 2
    assert sorted(seen) == sorted(s.name for s in plan.sites)
    # Each SE squeezes its block's branch (the opaque reduce's output), never the trunk.
    for name, got in seen.items():
        block = name.rsplit(".", 1)[0]
        assert torch.equal(got, ends[f"{block}.reduce"])


@pytest.mark.parametrize("expand", [True, False])
def test_opaque_layout_the_layers_do_not_tell_stays_unknown(expand: bool) -> None:
    # channels = height = width = 8, and the opaque part moves its conv's channels with an
    # einsum; without ``expand`` its output has its input's shape, which once passed for
    # "same layout as the input".
    model = nn.Sequential(SamePaddedConv(3, 8, 3, 2), OpaqueAmbiguous(8, expand))
    plan = find_sites(model, example_input=torch.randn(1, 3, 16, 16))
    assert plan.sites == ()
    assert [s.reason for s in plan.skipped] == [SkipReason.UNKNOWN_CHANNEL_AXIS]


def test_opaque_channels_last_output_is_followed_through_the_permute() -> None:
    class ToChannelsLast(SamePaddedConv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).permute(0, 2, 3, 1)

    class Block(nn.Module):
        """A channels-last residual whose branch is one opaque call."""

        def __init__(self) -> None:
            super().__init__()
            self.mix = ToChannelsLast(8, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.permute(0, 2, 3, 1) + self.mix(x)).permute(0, 3, 1, 2)

    model, x = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Block()), torch.randn(1, 3, 16, 16)
    plan = find_sites(model, example_input=x)  # 8 channels at 8x8: the permute inside decides
    assert [(s.kind, s.channels, s.channel_axis) for s in plan.sites] == [("residual", 8, -1)]
    seen, ends = _inject_and_watch(model, x, ["1.mix"])
    assert [torch.equal(got, ends["1.mix"]) for got in seen.values()] == [True]


def test_items_of_an_opaque_call_returning_several_tensors() -> None:
    class TwoLayouts(SamePaddedConv):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = super().forward(x)
            return y, y.permute(0, 2, 3, 1)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.part = TwoLayouts(8, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.permute(0, 2, 3, 1) + self.part(x)[1]).permute(0, 3, 1, 2)

    model, x = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Block()), torch.randn(1, 3, 16, 16)
    plan = find_sites(model, example_input=x)  # 8 channels at 8x8: the tuple's second item is channels-last
    assert [(s.kind, s.channels, s.channel_axis) for s in plan.sites] == [("residual", 8, -1)]
    model.eval()
    with torch.no_grad():
        before = model(x)
        inject_se(model, example_input=x)
        assert torch.equal(before, model(x))
