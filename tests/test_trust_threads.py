"""Analysis from several threads at once (issue 31, item 1).

torch.fx patches process-wide globals (``nn.Module.__call__`` and ``__getattr__``) while it
traces; two threads tracing at once recorded into each other's graphs (plans with 0 sites)
and restored each other's patches in the wrong order, leaving ``nn.Module.__call__`` patched
so that every later forward in the process failed. Analysis is serialised behind one lock.
"""

from __future__ import annotations

import threading

import pytest
import torch
from nets import Residual
from torch import nn

from se_inject import find_sites, inject_se, remove_se
from se_inject.analysis.tracing import trace
from se_inject.se_block import SEBlock

SIZE = 32
BLOCKS = 4
REPEATS = 20


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), *(Residual(width) for _ in range(BLOCKS)))


def _run_threads(models: list[nn.Module], job) -> list[object]:
    """Run ``job(model)`` ``REPEATS`` times in one thread per model, all started together."""
    results: list[object] = []
    start = threading.Barrier(len(models))

    def work(model: nn.Module) -> None:
        start.wait()
        for _ in range(REPEATS):
            try:
                results.append(job(model))
            except Exception as e:  # noqa: BLE001 - recorded, the test names it
                results.append(e)

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_find_sites_in_two_threads_gives_every_plan_whole_and_leaves_no_patch() -> None:
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    models = [_net(8), _net(16)]
    x = torch.randn(1, 3, SIZE, SIZE)
    expected = len(find_sites(models[0], example_input=x).sites)
    assert expected == BLOCKS
    found = _run_threads(models, lambda m: len(find_sites(m, example_input=x).sites))
    assert found == [expected] * (2 * REPEATS)
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
    assert models[0](x).shape == (1, 8, SIZE, SIZE)


def _inject_count_remove(model: nn.Module, x: torch.Tensor) -> tuple[int, bool]:
    """Inject, count the SE blocks and compare outputs, then take the SE blocks out again."""
    before = model(x)
    inject_se(model, example_input=x)
    try:
        return sum(isinstance(m, SEBlock) for m in model.modules()), torch.equal(model(x), before)
    finally:
        remove_se(model)


def test_inject_se_in_two_threads_injects_both_models_faithfully() -> None:
    x = torch.randn(1, 3, SIZE, SIZE)
    models = [_net(8).eval(), _net(16).eval()]
    done = _run_threads(models, lambda m: _inject_count_remove(m, x))
    assert done == [(BLOCKS, True)] * (2 * REPEATS)


class _FailsInTrace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.conv(x)
        raise RuntimeError("broken forward")


def test_a_trace_that_fails_leaves_no_patch_behind() -> None:
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    with pytest.raises(RuntimeError, match="broken forward"):
        trace(_FailsInTrace())
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
    assert nn.Conv2d(3, 3, 1)(torch.ones(1, 3, 2, 2)).shape == (1, 3, 2, 2)


def test_a_forward_in_another_thread_during_analysis_is_a_plain_forward() -> None:
    x = torch.randn(1, 3, SIZE, SIZE)
    analysed, other = _net(8), _net(8).eval()
    expected = other(x)
    plans: list[object] = []
    outputs: list[object] = []
    done = threading.Event()

    def analyse() -> None:
        try:
            plans.extend(len(find_sites(analysed, example_input=x).sites) for _ in range(REPEATS))
        finally:
            done.set()

    def forward() -> None:
        while not done.is_set():
            try:
                with torch.no_grad():
                    outputs.append(torch.equal(other(x), expected))
            except Exception as e:  # noqa: BLE001 - recorded, the test names it
                outputs.append(e)

    threads = [threading.Thread(target=analyse), threading.Thread(target=forward)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert plans == [BLOCKS] * REPEATS
    assert outputs and all(o is True for o in outputs), next(o for o in outputs if o is not True)
