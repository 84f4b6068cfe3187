"""Unanalysed reasons name the cause and the line: a module that does not trace is reported as
"``Block.forward`` branches on / takes len() of / iterates over / asks torch.jit.isinstance
about a traced value (file.py:line)", not as fx's long message or a later fallback's symptom
(a shape error from a wrong branch, an empty tensor on zeros). The rest of the model keeps its
sites."""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import pytest
import torch
from cli_helpers import SMALL, _isolated, report  # noqa: F401 - _isolated is an autouse fixture
from nets import PlainResidual
from torch import nn

import se_inject
from se_inject import find_sites, workflow
from se_inject.sites.diagnostics import unanalysed_summary

HERE = os.path.basename(__file__)


def _line(cls: type, marker: str = "# cause") -> int:
    """The source line of ``cls.forward`` carrying ``marker`` (where its forward fails to trace)."""
    lines, start = inspect.getsourcelines(cls.forward)
    (index,) = [i for i, text in enumerate(lines) if marker in text]
    return start + index


class _Branches(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # cause
            return x + y
        return x - y


class _Len(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)  # cause
        return x + self.conv(x) / n


class _Rows(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [row for row in x]  # cause
        return x + self.conv(torch.stack(rows))


class _JitIsinstance(nn.Module):
    """``torch.jit.isinstance`` of a Proxy answers False: untouched, the trace would take the
    ``else`` branch (no residual here, a shape error in real code) without any error."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.isinstance(x, torch.Tensor):  # cause
            return x + self.conv(x)
        return x


class _PlainNumber(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = int(x.shape[1])  # cause
        return x + self.conv(x) / scale


class _ReadsValues(nn.Module):
    """Traces, but its shapes depend on values: fake tensors fail on ``.item()``; on zeros the
    slice is empty and ``amax`` fails with an IndexError, a symptom."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = (x > 100).sum().item()
        return x + self.conv(x) + x.flatten(1)[:, :n].amax(1).view(-1, 1, 1, 1)


class _Net(nn.Module):
    """Stem, a plain residual block, the block under test (``odd``), another residual block."""

    def __init__(self, odd: type[nn.Module], c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a = PlainResidual(c)
        self.odd = odd(c)
        self.b = PlainResidual(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.odd(self.a(self.stem(x))))


X = torch.randn(2, 3, 16, 16)

CASES = [
    (_Branches, "branches on a traced value (if/while/bool)"),
    (_Len, "uses len() on a traced value"),
    (_Rows, "iterates over a traced value"),
    (_JitIsinstance, "uses torch.jit.isinstance on a traced value"),
    (_PlainNumber, "needs a plain Python value from a traced one"),
]


@pytest.mark.parametrize(("odd", "cause"), CASES, ids=[c[0].__name__ for c in CASES])
def test_reason_names_the_cause_and_the_line(odd: type[nn.Module], cause: str) -> None:
    plan = find_sites(_Net(odd).eval(), example_input=X)
    assert [s.owner for s in plan.sites] == ["a", "b"]
    (module,) = plan.unanalysed
    assert module.path == "odd"
    assert module.reason.startswith(f"{odd.__name__}.forward {cause}")
    assert module.reason.endswith(f" ({HERE}:{_line(odd)})")
    assert "\n" not in module.reason and os.path.dirname(os.path.abspath(__file__)) not in module.reason
    assert unanalysed_summary(plan) == f"1 module unanalysed (top reason, 1 of them: {module.reason})"


def test_the_control_model_is_analysed_whole() -> None:
    plan = find_sites(_Net(PlainResidual).eval(), example_input=X)
    assert [s.owner for s in plan.sites] == ["a", "odd", "b"]
    assert plan.unanalysed == () and unanalysed_summary(plan) == ""


def test_jit_isinstance_of_plain_values_still_traces_and_is_restored() -> None:
    class Flagged(PlainResidual):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.jit.isinstance(self.conv1.padding, tuple[int, int]):  # not a traced value
                return super().forward(x)
            return x

    before = torch.jit.isinstance
    plan = find_sites(_Net(Flagged).eval(), example_input=X)
    assert [s.owner for s in plan.sites] == ["a", "odd", "b"] and plan.unanalysed == ()
    assert torch.jit.isinstance is before


def test_a_later_fallback_error_does_not_replace_the_cause() -> None:
    plan = find_sites(_Net(_ReadsValues).eval(), example_input=X)
    reasons = {u.path: u.reason for u in plan.unanalysed}
    cause = "_ReadsValues.forward reads a tensor's values (.item()/.tolist()), so shapes depend on the data"
    assert reasons["odd"].startswith(cause)
    # the root's graph failed on the same node, inside ``odd``: it names that block, not _Net
    assert reasons[""].startswith(cause)
    assert not any("IndexError" in r or "amax" in r for r in reasons.values())


class _CountsItsInput(nn.Module):
    """Its part fails first (a branch); with the part kept as a call, its own ``len()`` fails."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.part = _Branches(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.part(x)
        return x + self.conv(y) / len(y)  # cause


def test_a_block_is_blamed_for_its_own_code_not_its_parts() -> None:
    plan = find_sites(_Net(_CountsItsInput).eval(), example_input=X)
    reasons = {u.path: u.reason for u in plan.unanalysed}
    assert reasons["odd.part"] == f"_Branches.forward branches on a traced value (if/while/bool) ({HERE}:{_line(_Branches)})"
    assert reasons["odd"] == f"_CountsItsInput.forward uses len() on a traced value ({HERE}:{_line(_CountsItsInput)})"
    assert [s.owner for s in plan.sites] == ["a", "b"]


def test_repeated_blocks_share_one_top_reason() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), PlainResidual(8), _Len(8), _Len(8), _Len(8))
    plan = find_sites(model, example_input=X)
    assert [u.path for u in plan.unanalysed] == ["2", "3", "4"]
    reason = f"_Len.forward uses len() on a traced value ({HERE}:{_line(_Len)})"
    assert unanalysed_summary(plan) == f"3 modules unanalysed (top reason, 3 of them: {reason})"
    with pytest.warns(UserWarning, match=r"3 modules unanalysed \(top reason, 3 of them: _Len\.forward uses len\(\)"):
        se_inject.inject_se(model, example_input=X)


def test_cli_report_names_the_cause(monkeypatch) -> None:
    real = workflow.load_model

    def load(*args: Any, **kwargs: Any):
        return dataclasses.replace(real(*args, **kwargs), model=_Net(_Len).eval())

    monkeypatch.setattr(workflow, "load_model", load)
    data = report(*SMALL, "--dry-run")
    assert data["unanalysed"] == [{"path": "odd", "reason": f"_Len.forward uses len() on a traced value ({HERE}:{_line(_Len)})"}]
    assert [s["owner"] for s in data["sites"]] == ["a", "b"]


class _PositionedBlock(nn.Module):
    """EdgeNeXt's pattern: a timm no-trace leaf called with a shape tuple read off the input."""

    def __init__(self, c: int) -> None:
        from timm.models.edgenext import PositionalEncodingFourier

        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.pos = PositionalEncodingFourier(hidden_dim=4, dim=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return x + self.conv(x) + self.pos((b, h, w))


def test_a_leaf_called_with_a_shape_tuple_gets_values_not_graph_nodes() -> None:
    # Was "TypeError: zeros(): ... found element of type Node": the leaf was analysed on the
    # caller's graph nodes, a symptom of se_inject's own, not of the model's code.
    plan = find_sites(_Net(_PositionedBlock).eval(), example_input=X)
    assert [s.owner for s in plan.sites] == ["a", "odd", "b"]
    assert plan.unanalysed == ()
