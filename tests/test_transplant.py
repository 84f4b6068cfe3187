"""Weight transplant without traps: SE weights made for one gate never load silently into another.

timm's ``seresnet*`` store SE layers as 1x1 convolutions, ``[out, in, 1, 1]``, trained with a plain
sigmoid gate. se-inject's default block gates with ``2 * sigmoid``, so those weights, loaded there,
compute another function (outputs off by several units): they are refused, before anything loads.
The paper gate takes them (tests/test_rewrite.py checks the outputs equal timm's seresnet18).
"""

from __future__ import annotations

import pytest
import timm
import torch

from se_inject import inject_se
from se_inject.errors import GateMismatchError, WeightsError
from se_inject.se_block import SEBlock


@pytest.fixture(scope="module")
def seresnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("seresnet18", num_classes=10).state_dict()


@pytest.mark.parametrize("kwargs", [{}, {"gate": "one_plus_tanh"}, {"identity_init": False, "gate": "tanh"}])
def test_timm_se_weights_are_refused_by_another_gate_and_nothing_loads(seresnet18_state, kwargs) -> None:
    model = inject_se(timm.create_model("resnet18", num_classes=10).eval(), **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GateMismatchError, match=r"layer1\.0\.se\.fc1\.weight .*identity_init=False \(gate 'sigmoid'\)"):
        model.load_state_dict(seresnet18_state, strict=True)
    assert issubclass(GateMismatchError, WeightsError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_block_loaded_on_its_own_refuses_them_too(seresnet18_state) -> None:
    block = SEBlock(64, 8)  # identity start, 2 * sigmoid
    state = {k.removeprefix("layer1.0.se."): v for k, v in seresnet18_state.items() if k.startswith("layer1.0.se.")}
    with pytest.raises(GateMismatchError, match="'scaled_sigmoid'"):
        block.load_state_dict(state)
    SEBlock(64, 8, gate="sigmoid", identity_init=False).load_state_dict(state)


def test_se_inject_weights_of_the_same_gate_still_load() -> None:
    # A plain state dict saved from an injected model (Linear [out, in] SE weights, as every
    # se-inject checkpoint holds) loads strictly into a fresh injection and gives its outputs.
    torch.manual_seed(0)
    trained = inject_se(timm.create_model("resnet18", num_classes=10).eval())
    with torch.no_grad():
        for m in trained.modules():
            if isinstance(m, SEBlock):
                m.fc2.bias.normal_()
    fresh = inject_se(timm.create_model("resnet18", num_classes=10).eval())
    fresh.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
