"""The pipeline end to end: nothing silently missed (rule 13), a plan is a promise (rule 14),
per-site configs through checkpoints, library-side stage validation, declared input sizes.

Small hand-made nets in the shapes that broke on real models (blocks in containers behind
control flow, transformers-style ``**kwargs`` layers, an smp-style U-Net), plus timm's Twins
at a small input.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from nets import Residual, perturb_se
from torch import nn

from se_inject import SEBlock, SkipReason, find_sites, inject_se, load, save
from se_inject.errors import ConfigError, SelectionError
from se_inject.models.input_size import model_input_size
from se_inject.plan import Plan, Unanalysed


def _built(model: nn.Module) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, SEBlock))


def _exact(model: nn.Module, x: torch.Tensor, **options) -> nn.Module:
    """Inject; check the promise (built == listed) and bit-exact outputs in eval mode."""
    model.eval()
    plan = find_sites(model, example_input=x, **options)
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        injected = inject_se(model, example_input=x, **options)
    # No retry, no "skipping" warning: at most the one line that counts unanalysed modules.
    messages = [str(w.message) for w in caught]
    if plan.unanalysed:
        assert len(messages) == 1 and f"; {len(plan.unanalysed)} module" in messages[0], messages
    else:
        assert messages == [], messages
    assert _built(injected) == sorted(s.name for s in plan.sites)
    with torch.no_grad():
        assert torch.equal(injected(x), before)
    return injected


# --- rule 13: containers are transparent ---------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x))


class _ListNet(nn.Module):
    """The issue's minimal case: blocks in a container, a root that does not trace."""

    def __init__(self, container: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        blocks = [_Block(16) for _ in range(3)]
        if container == "list":
            self.blocks = nn.ModuleList(blocks)
        elif container == "sequential":
            self.blocks = nn.Sequential(*blocks)
        else:  # nested: a dict of lists
            self.blocks = nn.ModuleDict({"a": nn.ModuleList(blocks[:2]), "b": nn.ModuleList(blocks[2:])})

    def _each(self) -> list[nn.Module]:
        if isinstance(self.blocks, nn.ModuleDict):
            return [b for group in self.blocks.values() for b in group]
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: the root does not trace
            x = x * 1
        x = self.stem(x)
        for b in self._each():
            x = b(x)
        return x


@pytest.mark.parametrize("container", ["list", "sequential", "dict-of-lists"])
def test_blocks_in_containers_get_se_behind_control_flow(container: str) -> None:
    model = _ListNet(container)
    x = torch.randn(1, 3, 32, 32)
    plan = find_sites(model, example_input=x)
    assert len(plan.sites) == 3 and all(s.kind == "residual" for s in plan.sites)
    (root,) = plan.unanalysed
    assert root.path == "" and root.reason.startswith("_ListNet.forward branches on a traced value (if/while/bool) (test_pipeline.py:")
    _exact(model, x)


class _KwargsLayer(nn.Module):
    """A transformers-style layer: optional mask, ``**kwargs`` read with ``.get``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        branch = self.bn(self.conv(hidden_states))
        if mask is not None:
            branch = branch * mask
        if kwargs.get("output_attentions", False):
            return branch
        return hidden_states + branch


class _KwargsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_KwargsLayer(8) for _ in range(2)])

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask=None, **kwargs)
        if x.mean() > 10:  # the root does not trace
            x = x - 1
        return x


def test_layers_taking_kwargs_trace_at_their_defaults() -> None:
    model = _KwargsNet()
    x = torch.randn(2, 8, 16, 16)
    plan = find_sites(model, example_input=x)
    assert [s.name for s in plan.sites] == ["layers.0.se", "layers.1.se"]
    assert [u.path for u in plan.unanalysed] == [""]
    _exact(model, x)


class _Moody(nn.Module):
    """A part with data-dependent control flow of its own: it cannot be traced."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.mean() < 100 else -y


class _BlockWithMoodyPart(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.part = _Moody(c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.part(x))


def test_block_keeps_its_residual_site_when_a_part_does_not_trace() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _BlockWithMoodyPart(8), _BlockWithMoodyPart(8))
    x = torch.randn(2, 3, 16, 16)
    plan = find_sites(model, example_input=x)
    assert [s.name for s in plan.sites] == ["1.se", "2.se"]
    cause = "_Moody.forward branches on a traced value (if/while/bool) (test_pipeline.py:"
    assert [(u.path, u.reason.startswith(cause)) for u in plan.unanalysed] == [("1.part", True), ("2.part", True)]
    _exact(model, x)


def test_unanalysed_reasons_round_trip_and_old_lists_load() -> None:
    plan = find_sites(_ListNet("list"), example_input=torch.randn(1, 3, 16, 16))
    assert Plan.from_dict(plan.to_dict()) == plan
    old = plan.to_dict()
    old["unanalysed"] = ["", "blocks"]  # plans saved before reasons were recorded
    assert Plan.from_dict(old).unanalysed == (Unanalysed(""), Unanalysed("blocks"))


# --- rule 14: a plan is a promise ----------------------------------------------------------------


class _DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(cin + skip, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [_DecoderBlock(64, 32, 32), _DecoderBlock(32, 16, 16), _DecoderBlock(16, 8, 8), _DecoderBlock(8, 0, 4)]
        )

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        features = features[::-1]
        x, skips = features[0], features[1:]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(Residual(8), Residual(8))
        self.down = nn.ModuleList([nn.Conv2d(c, 2 * c, 3, stride=2, padding=1) for c in (8, 16, 32)])
        self.layers = nn.ModuleList([nn.Sequential(Residual(c), Residual(c)) for c in (16, 32, 64)])

    def stages(self) -> list[nn.Module]:
        # Built on the fly, as smp's encoders do: the encoder does not trace as a whole.
        return [nn.Sequential(self.stem, self.layer1)] + [nn.Sequential(d, m) for d, m in zip(self.down, self.layers, strict=True)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages():
            x = stage(x)
            features.append(x)
        return features


class _UNet(nn.Module):
    """A segmentation U-Net in the shape of segmentation_models_pytorch's."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Encoder()
        self.decoder = _Decoder()
        self.head = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 16:
            raise ValueError("input must be divisible by 16")
        return self.head(self.decoder(*self.encoder(x)))


def test_segmentation_unet_builds_exactly_the_listed_sites() -> None:
    torch.manual_seed(0)
    model = _UNet()
    x = torch.randn(2, 3, 32, 32)
    plan = find_sites(model, example_input=x)
    encoder = [s.name for s in plan.sites if s.name.startswith("encoder.")]
    assert encoder == ["encoder.layer1.0.se", "encoder.layer1.1.se"] + [
        f"encoder.layers.{i}.{j}.se" for i in range(3) for j in range(2)
    ]
    assert {"", "encoder", "decoder"} <= {u.path for u in plan.unanalysed}
    _exact(model, x)


def test_twins_lists_what_it_builds() -> None:
    # Twins' position encoder is called with ``(x, (H, W))``, the sizes read from the input: it
    # owns its residual (the depthwise conv on the map plus the map), traced with one input per
    # size, so the rebuilt encoder follows the input's size.
    model = timm.create_model("twins_svt_small", img_size=64, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    plan = find_sites(model, example_input=x)
    assert [(s.name, str(s.kind), s.owner_inputs) for s in plan.sites] == [
        (f"pos_block.{i}.se", "residual", 2) for i in range(len(model.pos_block))
    ]
    assert not any(s.reason is SkipReason.NOT_REWRITABLE for s in plan.skipped)
    other = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        before, before_other = model(x), model(other)
    injected = inject_se(model, example_input=x) if plan.sites else model
    assert _built(injected) == sorted(s.name for s in plan.sites)
    with torch.no_grad():
        assert torch.equal(injected(x), before)
        assert torch.equal(injected(other), before_other)



def test_two_injections_with_different_options_save_and_load_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    base = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    model = inject_se(model, include=["layer1.*"], example_input=x)
    model = inject_se(model, include=["layer2.*"], bias=False, gate="one_plus_tanh", example_input=x)
    sites = model.se_inject_plan.sites
    assert [s.name for s in sites] == ["layer1.0.se", "layer1.1.se", "layer2.0.se", "layer2.1.se"]
    assert [(s.config.bias, s.config.gate) for s in sites] == [(True, "scaled_sigmoid")] * 2 + [(False, "one_plus_tanh")] * 2
    assert model.layer2[0].se.fc1.bias is None and model.layer1[0].se.fc1.bias is not None
    perturb_se(model)
    save(model, tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt", base_model=base)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(loaded(x), out)
    assert loaded.se_inject_plan.sites == sites


def test_a_plan_with_one_config_for_all_sites_still_loads() -> None:
    plan = find_sites(torchvision.models.resnet18(), bias=False, example_input=torch.randn(1, 3, 64, 64))
    old = plan.to_dict()
    for site in old["sites"]:
        del site["config"]  # checkpoints before per-site configs
    loaded = Plan.from_dict(old)
    assert all(s.config == plan.config and not s.config.bias for s in loaded.sites)
    assert loaded == plan


# --- stages: library-side validation, meaning independent of the placement ------------------------


def test_unknown_stage_is_refused_with_the_models_stages() -> None:
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(SelectionError, match=r"stage 5: ResNet has 4 stages .*: 0 \(16x16\), 1 \(8x8\), 2 \(4x4\), 3 \(2x2\)"):
        inject_se(model, stages=[5], example_input=x)
    with pytest.raises(SelectionError, match="resolution 7: ResNet has SE sites at resolutions 16, 8, 4, 2"):
        find_sites(model, resolutions=[7], example_input=x)
    assert issubclass(SelectionError, ConfigError) and not any(isinstance(m, SEBlock) for m in model.modules())
    plan = find_sites(model, stages=[1, 3], example_input=x)
    assert [s.name for s in plan.sites] == ["layer2.0.se", "layer2.1.se", "layer4.0.se", "layer4.1.se"]


@pytest.mark.parametrize("placement", ["pre", "inner"])
def test_stages_keep_their_meaning_under_every_placement(placement: str) -> None:
    model = torchvision.models.resnet50()
    x = torch.randn(1, 3, 64, 64)
    standard = {s.owner: s.stage for s in find_sites(model, example_input=x).sites}
    moved = {s.owner: s.stage for s in find_sites(model, placement=placement, example_input=x).sites}
    assert moved == standard and standard["layer4.0"] == 3


# --- the declared input size ---------------------------------------------------------------------


class _StdConv(nn.Conv2d):
    """A Conv2d subclass as first layer (timm's StdConv2d is one)."""


@pytest.mark.parametrize(
    ("conv", "expected"),
    [(_StdConv, (3, 224, 224)), (nn.Conv1d, (3, 224)), (nn.Conv3d, (3, 16, 112, 112))],
)
def test_any_convolution_as_first_layer_gives_a_default_input(conv: type[nn.Module], expected) -> None:
    model = nn.Sequential(conv(3, 8, 3, padding=1), Residual(8) if conv is not nn.Conv3d else nn.Identity())
    assert model_input_size(model) == expected
    if conv is _StdConv:
        (site,) = find_sites(model).sites  # analysed at 224 without an example input
        assert site.spatial == (224, 224)


def test_declared_sizes_of_timm_transformers_and_torchvision_models() -> None:
    assert model_input_size(timm.create_model("resnet10t", pretrained=False)) == (3, 176, 176)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), Residual(8))
    model.config = type("Config", (), {"image_size": 48, "num_channels": 1})()  # transformers-style
    assert model_input_size(model) == (1, 48, 48)
    assert find_sites(model).sites[0].spatial == (48, 48)
    with torch.device("meta"):
        tv = {name: torchvision.models.get_model(name) for name in ("efficientnet_b3", "swin_v2_t", "inception_v3")}
    assert {name: model_input_size(m) for name, m in tv.items()} == {
        "efficientnet_b3": (3, 300, 300),
        "swin_v2_t": (3, 256, 256),
        "inception_v3": (3, 299, 299),
    }


# --- analysis cost --------------------------------------------------------------------------------


def test_no_trace_leaves_without_sites_are_traced_once_per_kind(monkeypatch) -> None:
    from timm.layers import BatchNormAct2d

    import se_inject.sites.units as units

    traced: list[type] = []
    real = units.trace

    def counting(module, **kwargs):
        traced.append(type(module))
        return real(module, **kwargs)

    monkeypatch.setattr(units, "trace", counting)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(6)])
            self.norms = nn.ModuleList([BatchNormAct2d(8) for _ in range(6)])  # timm no-trace leaves

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for conv, norm in zip(self.convs, self.norms, strict=True):
                x = x + norm(conv(x))
            return x

    plan = find_sites(Net(), example_input=torch.randn(2, 8, 16, 16))
    assert len(plan.sites) == 6
    assert traced.count(BatchNormAct2d) == 1


def test_a_call_with_data_other_than_defaults_is_not_standalone() -> None:
    """DLA calls its trees with ``children=[...]`` where the default is None: such a block is
    not rebuilt on its own (its trace would assert children is None)."""
    from se_inject.analysis.calls import leading_tensors, standalone_call

    class Tree(nn.Module):
        def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, children: list | None = None) -> torch.Tensor:
            return x

    tree = Tree()
    assert standalone_call(tree, (("tensor", None),), ())
    assert standalone_call(tree, (("tensor", None), ("NoneType", None)), ())
    assert not standalone_call(tree, (("tensor", None), ("NoneType", None), ("list", None)), ())
    assert not standalone_call(tree, (("tensor", None),), (("children", "list", None),))
    # An optional tensor (DLA's ``skip``) is a placeholder of its own: the block is rebuilt with
    # two inputs (rule 7: a shortcut the parent passes in is still the trunk).
    assert standalone_call(tree, (("tensor", None), ("tensor", None)), ())
    assert leading_tensors((("tensor", None), ("tensor", None), ("NoneType", None))) == 2


class _C2f(nn.Module):
    """YOLOv8's C2f: ``list(x.chunk(2, 1))`` then a growing list, concatenated."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(c, 2 * c, 1)
        self.m = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()) for _ in range(2)])
        self.cv2 = nn.Conv2d(4 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.m[0][0].in_channels % 2:  # a split of known sizes unpacks too
            u, v = self.cv1(x).split([self.m[0][0].in_channels, self.m[0][0].in_channels], 1)
            y = [u, v]
        else:
            y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def test_chunks_and_splits_of_known_length_trace() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _C2f(8), nn.Conv2d(8, 7, 1), _C2f(7))
    x = torch.randn(2, 3, 16, 16)
    plan = find_sites(model, example_input=x)
    assert plan.unanalysed == ()
    assert plan.sites
    _exact(model, x)


def test_a_module_shared_by_several_blocks_is_named_where_it_is_called() -> None:
    """ultralytics' Conv blocks share one activation instance: fx names every call of it by
    its first registration, which put block 2's calls inside block 1 (its residual looked like
    a fusion reaching outside the block)."""
    act = nn.SiLU()

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.act = act  # the same module object in every block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.act(self.conv(x))

    model = nn.Sequential(nn.Conv2d(3, 8, 1), Block(), Block(), Block())
    x = torch.randn(2, 3, 16, 16)
    plan = find_sites(model, example_input=x)
    assert [s.name for s in plan.sites] == ["1.se", "2.se", "3.se"]
    assert plan.skipped == ()
    _exact(model, x)
