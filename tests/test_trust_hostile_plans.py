"""A checkpoint whose plan does not match its tensors is refused before anything is built
(issue 31, item 4).

A plan saying ``hidden=2000000`` next to tensors of (8, 64) made ``load`` build SE blocks of a
gigabyte before the strict load refused them. The plan is checked against the file's tensor
shapes first: the refused load's peak memory stays near the file's size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from nets import Residual
from torch import nn

import se_inject.se_block
from se_inject import inject_se
from se_inject.errors import CheckpointError
from se_inject.io.checkpoint import save
from se_inject.io.restore import load

TESTS = Path(__file__).parent
X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
HOSTILE_HIDDEN = 2_000_000  # fc1 and fc2 of 64 channels: 2 x 512 MB of float32


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), Residual(64), Residual(64)).eval()


def _checkpoint(path: Path, **site_changes: object) -> Path:
    """A real checkpoint of ``_net()`` with SE, its first site's plan entry edited."""
    save(inject_se(_net(), example_input=X), path)
    data = torch.load(path, weights_only=True)
    data["plan"]["sites"][0].update(site_changes)
    torch.save(data, path)
    return path


@pytest.fixture
def no_se_built(monkeypatch) -> list[tuple[int, int]]:
    built: list[tuple[int, int]] = []
    original = se_inject.se_block.SEBlock.__init__

    def counting(self, channels: int, hidden: int, **kwargs: object) -> None:
        built.append((channels, hidden))
        original(self, channels, hidden, **kwargs)

    monkeypatch.setattr(se_inject.se_block.SEBlock, "__init__", counting)
    return built


def test_a_plan_wider_than_its_tensors_is_refused_before_any_se_block_is_built(tmp_path, no_se_built) -> None:
    path = _checkpoint(tmp_path / "model.pt", hidden=HOSTILE_HIDDEN)
    no_se_built.clear()  # (the checkpoint's own)
    base = _net()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"site 1\.se has 64 channels and hidden width 2000000, so fc1\.weight "
                                              r"would be \(2000000, 64\), but the file holds \(8, 64\)"):
        load(path, base_model=base)
    assert no_se_built == []
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


def test_a_plan_whose_blocks_hold_more_values_than_the_file_is_refused(tmp_path, no_se_built) -> None:
    """Sites named where the file has no tensors are bounded too: by all the file holds."""
    path = _checkpoint(tmp_path / "model.pt", hidden=HOSTILE_HIDDEN, name="1.se_elsewhere")
    no_se_built.clear()
    with pytest.raises(CheckpointError, match=r"SE blocks hold [\d,]+ values, more than the [\d,]+ the file holds"):
        load(path, base_model=_net())
    assert no_se_built == []


@pytest.mark.parametrize("hidden", [0, -8, "8", True])
def test_a_plan_with_a_width_that_is_no_positive_integer_is_refused(tmp_path, no_se_built, hidden: object) -> None:
    path = _checkpoint(tmp_path / "model.pt", hidden=hidden)
    no_se_built.clear()
    with pytest.raises(CheckpointError, match="positive integers expected"):
        load(path, base_model=_net())
    assert no_se_built == []


def test_an_unedited_checkpoint_still_loads_bit_exact(tmp_path) -> None:
    path = _checkpoint(tmp_path / "model.pt")
    injected = inject_se(_net(), example_input=X)
    assert torch.equal(load(path, base_model=_net()).eval()(X), injected(X))


_MEASURE = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {tests!r})
    import torch
    from test_trust_hostile_plans import _net
    from se_inject.errors import SEInjectError
    from se_inject.io.restore import load
    base = _net()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load({path!r}, base_model=base)
    except SEInjectError as e:  # (refused late, by the strict load, before the plan was checked)
        print(type(e).__name__)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


def test_the_peak_memory_of_a_refused_load_stays_near_the_file_size(tmp_path) -> None:
    path = _checkpoint(tmp_path / "model.pt", hidden=HOSTILE_HIDDEN)
    size = path.stat().st_size
    script = _MEASURE.format(tests=str(TESTS), path=str(path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    refused, grown = done.stdout.split()
    # The hostile blocks would be over 1 GB; the file is well under 1 MB. Allow the file twice
    # over and 64 MB for what reading a file and raising an error cost.
    assert int(grown) < 2 * size + 64 * 2**20, (int(grown), size)
    assert refused == "CheckpointError"
