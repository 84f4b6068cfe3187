"""Analysis leaves the model exactly as it found it (issue 16, item 1).

``find_sites`` and ``inject_se`` run the user's modules forward on fake or meta tensors, fx
proxies and (for the post-build check) one real sample. One small model per way a module
caches on ``self`` during forward: a detection head that stores anchors, strides and the
input shape; a buffer reassigned in forward next to call counters and an RNG draw; a
LeViT-style attention-bias dict filled in eval mode; the same on a model in train mode. After
analysis, and after a failed ``inject_se``, each must pickle, save, hold no fake tensor or
proxy, keep its attributes, flags and buffers, give an untouched copy's outputs, and leave
torch's RNG state as it was.
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from nets import PlainResidual, force_rebuild
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import se_inject.api
import se_inject.inject.build
from se_inject import UnfaithfulRebuildError, find_sites, gate_statistics, inject_se
from se_inject.inject.rebuilt import RebuiltBlock
from se_inject.plan import PLAN_ATTR
from se_inject.report.complexity import count

SIZE = 64


class AnchorHead(nn.Module):
    """YOLO-style: anchors and strides made on the first call at a shape, cached on ``self``
    (``self.shape != shape`` does not trace, so analysis runs it on fake tensors)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 1)
        self.shape: torch.Size | None = None
        self.anchors = torch.empty(0)
        self.strides = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.shape != x.shape:
            w = x.shape[-1]
            self.anchors = torch.arange(w, dtype=x.dtype, device=x.device) + 0.5
            self.strides = torch.full((w,), SIZE / w, dtype=x.dtype, device=x.device)
            self.shape = x.shape
        return y * self.strides + self.anchors


class AnchorNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block1 = PlainResidual(8)
        self.block2 = PlainResidual(8)
        self.head = AnchorHead(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))))


class Tracker(nn.Module):
    """Reassigns a registered buffer in forward, counts its calls (a plain int and a buffer
    incremented in place) and draws a random number."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("last", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen += 1
        self.last = x.detach().mean()
        return x + 0.0 * torch.rand(())


class TrackerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block1 = PlainResidual(8)
        self.track = Tracker()
        self.block2 = PlainResidual(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.track(self.block1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class BiasAttention(nn.Module):
    """timm LeViT's attention-bias cache: in eval mode the bias is kept per device in a dict."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, c, 1)
        self.bias = nn.Parameter(torch.randn(c, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def get_bias(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.bias * 2
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x) + self.get_bias(x.device)


class CacheNet(nn.Module):
    """Pads odd inputs to an even size: that test does not trace, so analysis runs the whole
    model on fake tensors (in eval mode) to find its blocks' inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = PlainResidual(8)
        self.attn = BiasAttention(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return self.fc(self.attn(self.block(self.stem(x))).mean((2, 3)))


# --- what "as it found it" means ---------------------------------------------------------------


def _fingerprint(value: Any, seen: set[int]) -> Any:
    """A comparable picture of one attribute value: identity and contents of tensors,
    containers walked, modules and other objects by identity."""
    if isinstance(value, torch.Tensor):
        data = None if value.is_meta or isinstance(value, FakeTensor) else value.detach().cpu().flatten().tolist()
        return ("tensor", id(value), type(value).__name__, str(value.device), value.dtype, tuple(value.shape), data)
    if isinstance(value, (dict, list, tuple, set)):
        if id(value) in seen:
            return ("seen", id(value))
        seen = seen | {id(value)}
        if isinstance(value, dict):
            return (type(value).__name__, id(value), [(k, _fingerprint(v, seen)) for k, v in value.items()])
        items = sorted(value, key=repr) if isinstance(value, set) else value
        return (type(value).__name__, [_fingerprint(v, seen) for v in items])
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    return (type(value).__name__, id(value))


def _state(model: nn.Module) -> dict[str, Any]:
    """Every module's class and every entry of its ``__dict__``, by module path."""
    return {
        path: (type(m), {k: _fingerprint(v, set()) for k, v in m.__dict__.items()})
        for path, m in model.named_modules(remove_duplicate=False)
    }


def _user_state(model: nn.Module) -> dict[str, Any]:
    """The attributes and buffers of this file's modules (rebuilt ones through their
    original): what ``inject_se`` must not change while it adds SE blocks."""
    found = {}
    for path, m in model.named_modules():
        m = m.original if isinstance(m, RebuiltBlock) else m
        if type(m).__module__ == __name__:
            attrs = {k: _fingerprint(v, set()) for k, v in vars(m).items() if not k.startswith("_") and k != PLAN_ATTR}
            buffers = {k: _fingerprint(v, set()) for k, v in m._buffers.items()}
            found[path] = (attrs, buffers, m.training)
    return found


def _leaks(model: nn.Module) -> list[str]:
    """Paths of fake tensors, meta tensors and fx proxies held anywhere in a module's ``__dict__``."""
    found: list[str] = []

    def walk(value: Any, where: str, seen: set[int]) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, (FakeTensor, fx.Proxy)) or (isinstance(value, torch.Tensor) and value.is_meta):
            found.append(f"{where}: {type(value).__name__}")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k, f"{where}[key]", seen)
                walk(v, f"{where}[{k!r}]", seen)
        elif isinstance(value, (list, tuple, set)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]", seen)

    for path, m in model.named_modules():
        for k, v in m.__dict__.items():
            if not isinstance(v, nn.Module):
                walk(v, f"{path or 'model'}.{k}", set())
    return found


def _saves(model: nn.Module) -> None:
    pickle.dumps(model)
    torch.save(model, io.BytesIO())
    torch.save(model.state_dict(), io.BytesIO())


def _same_outputs(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        for mode in (False, True):
            model.train(mode)
            reference.train(mode)
            got, want = model(x), reference(x)
            assert type(got) is torch.Tensor and torch.equal(got, want)


MODELS = {
    "anchors": lambda: AnchorNet().eval(),
    "buffer-and-counter": lambda: TrackerNet().eval(),
    "eval-dict-cache": lambda: CacheNet().eval(),
    "train-mode-cache": lambda: CacheNet().train(),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():  # one real call first: the head's anchors, the counters hold real values
        model(torch.randn(1, 3, SIZE, SIZE))
    if isinstance(model, CacheNet):  # the bias cache empty, as before a first eval call
        model.attn.cache.clear()
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_find_sites_leaves_the_model_as_it_found_it(name: str) -> None:
    model = _build(name)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    before, flags, rng = _state(model), [m.training for m in model.modules()], torch.random.get_rng_state()
    plan = find_sites(model, example_input=x)
    assert plan.sites  # the analysis did run on the blocks
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert _leaks(model) == []
    _saves(model)
    assert [m.training for m in model.modules()] == flags
    assert _state(model) == before
    _same_outputs(model, reference, torch.randn(1, 3, SIZE, SIZE))


@pytest.mark.filterwarnings("ignore:SE inserted at")  # the untraceable heads and tops are named
@pytest.mark.parametrize("mechanism", ["attached", "rebuilt"])
@pytest.mark.parametrize("name", list(MODELS))
def test_inject_se_keeps_the_user_state(name: str, mechanism: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if mechanism == "rebuilt":
        force_rebuild(monkeypatch)
    model = _build(name)
    reference = copy.deepcopy(model)
    before = _user_state(model)
    injected = inject_se(model, example_input=torch.randn(2, 3, SIZE, SIZE))
    assert mechanism in {s.mechanism for s in getattr(injected, PLAN_ATTR).sites}
    assert any(isinstance(m, RebuiltBlock) for m in injected.modules()) == (mechanism == "rebuilt")
    assert _leaks(injected) == []
    _saves(injected)
    assert _user_state(injected) == before
    _same_outputs(injected, reference, torch.randn(1, 3, SIZE, SIZE))


def test_failed_install_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    force_rebuild(monkeypatch)  # blocks swapped in one by one: the failure comes after the first
    model = _build("buffer-and-counter")
    reference = copy.deepcopy(model)
    before = _state(model)
    swapped = []
    real = se_inject.inject.build.replace_module

    def fail_second(model: nn.Module, path: str, new: nn.Module) -> None:
        if swapped:
            raise RuntimeError("interrupted mid-install")
        swapped.append(path)
        real(model, path, new)

    monkeypatch.setattr(se_inject.inject.build, "replace_module", fail_second)
    with pytest.raises(RuntimeError, match="mid-install"):
        inject_se(model, example_input=torch.randn(2, 3, SIZE, SIZE))
    assert swapped  # one block had been swapped in before the failure
    assert _leaks(model) == []
    _saves(model)
    assert _state(model) == before
    _same_outputs(model, reference, torch.randn(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", ["buffer-and-counter", "eval-dict-cache"])
def test_failed_check_leaves_the_model_as_it_was(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    force_rebuild(monkeypatch)  # only rebuilt blocks are checked
    model = _build(name)
    reference = copy.deepcopy(model)
    before = _state(model)
    real = se_inject.inject.build.check_rebuilt

    def unfaithful(rebuilt: Any, calls: Any) -> None:
        real(rebuilt, calls)  # the check's forwards run, then it reports a difference
        raise UnfaithfulRebuildError("the rebuilt block computes other outputs", owner=next(iter(rebuilt)))

    monkeypatch.setattr(se_inject.inject.build, "check_rebuilt", unfaithful)
    with pytest.raises(UnfaithfulRebuildError):
        inject_se(model, example_input=torch.randn(2, 3, SIZE, SIZE))
    assert _leaks(model) == []
    _saves(model)
    assert _state(model) == before
    _same_outputs(model, reference, torch.randn(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", list(MODELS))
def test_counting_leaves_the_model_as_it_found_it(name: str) -> None:
    model = _build(name)
    reference = copy.deepcopy(model)
    before, rng = _state(model), torch.random.get_rng_state()
    assert count(model, (3, SIZE // 2, SIZE // 2)).macs  # another size: the head makes new anchors
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert _leaks(model) == []
    assert _state(model) == before
    _same_outputs(model, reference, torch.randn(1, 3, SIZE, SIZE))


@pytest.mark.filterwarnings("ignore:SE inserted at")
def test_gate_statistics_leave_a_train_mode_model_as_they_found_it() -> None:
    model = inject_se(_build("train-mode-cache"), example_input=torch.randn(2, 3, SIZE, SIZE))
    before = _user_state(model)
    stats = gate_statistics(model, [torch.randn(2, 3, SIZE, SIZE)])
    assert stats and all(m.training for m in model.modules())
    attn = model.attn.original if isinstance(model.attn, RebuiltBlock) else model.attn
    assert attn.cache == {} and _user_state(model) == before


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[str, list[torch.Tensor]] = {"seen": []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache["seen"].append(x)
        self.extra = nn.Identity()  # a child added in forward
        return x


def test_preserved_state_restores_nested_containers_also_on_errors() -> None:
    from se_inject.analysis.sandbox import preserved_state

    model = nn.Sequential(_Nested()).train()
    held, before, rng = model[0].cache["seen"], _state(model), torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="stop"), preserved_state(model):
        model.eval()
        model(torch.ones(1))
        torch.rand(3)
        raise RuntimeError("stop")
    assert model[0].cache["seen"] is held and held == [] and _state(model) == before
    assert torch.equal(torch.random.get_rng_state(), rng)
