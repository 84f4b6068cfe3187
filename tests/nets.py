"""Tiny hand-made networks, one per placement rule, shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Residual(nn.Module):
    """``x + branch(x)`` in the spellings placement rule 1 lists, optionally with a projection,
    layer scale, a scalar scale, dropout in the branch or an in-place add; with
    ``functional_end`` the branch ends in a function, so its SE block is rebuilt in, not attached."""

    def __init__(
        self,
        cin: int,
        cout: int | None = None,
        *,
        stride: int = 1,
        spelling: str = "+",
        layer_scale: bool = False,
        scale: float | None = None,
        dropout: bool = False,
        functional_end: bool = False,
    ) -> None:
        super().__init__()
        cout = cout or cin
        #: end the branch in a function (``torch.tanh``), not a module: its owner is rebuilt
        self.functional_end = functional_end
        self.branch = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.ReLU(), conv_bn(cout, cout))
        self.shortcut = conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None
        self.gamma = nn.Parameter(torch.full((cout, 1, 1), 0.5)) if layer_scale else None
        self.scale = scale
        self.spelling = spelling
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if self.functional_end:
            out = torch.tanh(out)
        if self.dropout:
            out = F.dropout(out, 0.2, self.training)
        if self.gamma is not None:
            out = out * self.gamma
        shortcut = x if self.shortcut is None else self.shortcut(x)
        if self.scale is not None:
            return torch.relu(out * self.scale + shortcut)
        if self.spelling == "+=":
            out += shortcut
        elif self.spelling == "torch.add":
            out = torch.add(shortcut, out)
        elif self.spelling == "add_":
            out = out.add_(shortcut)
        else:
            out = shortcut + out  # trunk first: the order of operands must not matter
        return torch.relu(out)


class PlainResidual(nn.Module):
    """The barest residual block: ``x + conv2(relu(conv1(x)))``, no norms, ``c`` channels."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class Inception(nn.Module):
    """Parallel branches of the same input, concatenated on channels (one may be a pool)."""

    def __init__(self, cin: int, widths: tuple[int, ...] = (8, 8), pool_branch: bool = False) -> None:
        super().__init__()
        self.branches = nn.ModuleList(conv_bn(cin, w, 1 if i == 0 else 3) for i, w in enumerate(widths))
        self.pool_branch = pool_branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [torch.relu(b(x)) for b in self.branches]  # non-linear: a real Inception module (rule 10)
        if self.pool_branch:
            outs.append(F.max_pool2d(x, 3, 1, 1))
        return torch.cat(outs, 1)


class Dense(nn.Module):
    """DenseNet-style block: each layer sees the concatenation of all earlier features."""

    def __init__(self, cin: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(cin + i * growth), nn.ReLU(), nn.Conv2d(cin + i * growth, growth, 3, 1, 1))
            for i in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Gated(nn.Module):
    """A residual block whose branch already has SE-like gating (hand-written, not ours)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = conv_bn(c, c)
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        y = y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return x + y


class ChannelsLast(nn.Module):
    """A ConvNeXt/Swin-style residual on [B, H, W, C] maps: Linear layers on the last axis."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Tokens(nn.Module):
    """A transformer MLP residual on a token sequence [B, N, C], with a positional embedding."""

    def __init__(self, c: int, n: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, n, c))
        self.fc = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos  # rule 6: a parameter operand, not a residual
        return x + self.fc(x)


class TwoInputFusion(nn.Module):
    """FPN-like: a top-down feature added to a lateral one from a different input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.lateral = nn.Conv2d(c, c, 1)
        self.top = conv_bn(c, c)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lateral(a) + self.top(b)


class Res2NetLike(nn.Module):
    """Hierarchical splits inside a residual branch: the inner sums are nested."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(c, c, 1)
        self.convs = nn.ModuleList(conv_bn(c // 2, c // 2) for _ in range(2))
        self.conv3 = conv_bn(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.conv1(x)).chunk(2, 1)
        a = self.convs[0](a)
        b = self.convs[1](b + a)
        return torch.relu(x + self.conv3(torch.cat([a, b], 1)))


class Residual1d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class Residual3d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.BatchNorm3d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class Untraceable(nn.Module):
    """Top level with data-dependent control flow; its blocks trace fine on their own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block1 = Residual(16)
        self.block2 = Residual(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.mean() > -1.0:  # symbolic tracing cannot follow this
            x = self.block1(x)
        return self.block2(x)


class RootResidual(nn.Module):
    """The residual addition lives in the root's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.conv1 = conv_bn(8, 8)
        self.conv2 = conv_bn(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return x + self.conv2(torch.relu(self.conv1(x)))


class AppendList(nn.Module):
    """VoVNet-style: the block's forward takes a list from its parent."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = conv_bn(c, c)

    def forward(self, x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        feats.append(self.conv(x))
        return torch.cat(feats, 1)


class PassesList(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = AppendList(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, [x])


class OptionalArg(nn.Module):
    """DLA-style: an optional argument the parent leaves at None."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = conv_bn(c, c)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if extra is not None:
            x = x + extra
        return x + self.branch(x)


# --------------------------------------------------------------------------------------------
# Nets for the general placement rules (placement rules 1, 3, 4, 7, 9-12; README, "How sites are found")


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(*conv_bn(cin, cout, k, stride), nn.ReLU())


class DualPath(nn.Module):
    """DPN-style block: the branch's first ``k`` channels add to the input's first ``k``, the
    input's other channels are carried and the branch's other channels are new (rule 4, 9)."""

    def __init__(self, c: int, k: int, new: int, spelling: str = "slice") -> None:
        super().__init__()
        self.k, self.new, self.spelling = k, new, spelling
        self.branch = nn.Sequential(conv_bn_relu(c, c), conv_bn(c, k + new))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        k = self.k
        if self.spelling == "narrow":
            x1, x2 = x.narrow(1, 0, k), x.narrow(1, k, x.shape[1] - k)
            y1, y2 = y.narrow(1, 0, k), y.narrow(1, k, self.new)
        elif self.spelling == "split":
            x1, x2 = torch.split(x, [k, x.shape[1] - k], 1)
            y1, y2 = y.split([k, self.new], dim=1)
        else:
            x1, x2, y1, y2 = x[:, :k], x[:, k:], y[:, :k], y[:, k:]
        return torch.cat([x1 + y1, x2, y2], dim=1)


class TakesShortcut(nn.Module):
    """DLA-style basic block: the parent may pass the shortcut in (rule 7)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(conv_bn_relu(c, c), conv_bn(c, c))

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        return torch.relu(shortcut + self.branch(x))


class Tree(nn.Module):
    """DLA-style tree: ``tree1(x, project(x))``, ``tree2(x1)``, a root over both outputs; a
    tree may itself be called with a shortcut and nest trees (rule 7 and 9)."""

    def __init__(self, c: int, levels: int = 1, project: bool = False) -> None:
        super().__init__()
        self.project = conv_bn(c, c, 1) if project else nn.Identity()
        make = (lambda: Tree(c, levels - 1)) if levels > 1 else (lambda: TakesShortcut(c))
        self.tree1, self.tree2 = make(), make()
        self.root = conv_bn_relu(2 * c, c, 1)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = self.project(x)
        x1 = self.tree1(x, shortcut)
        x2 = self.tree2(x1)
        return self.root(torch.cat([x2, x1], 1))


class SumThenNew(nn.Module):
    """``cat([x + branch(x), new(x)])``: a residual site and a dense site (rule 9)."""

    def __init__(self, c: int, new: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(conv_bn_relu(c, c), conv_bn(c, c))
        self.new = conv_bn_relu(c, new)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x + self.branch(x)), self.new(x)], 1)


class CrossStage(nn.Module):
    """CSP / C2f-style stage: half the channels carried, half through residual blocks and an
    optional transition; the concatenation aggregates finished blocks (rule 9)."""

    def __init__(self, c: int, blocks: int = 2, transition: bool = True, attention: bool = False) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Residual(c // 2) for _ in range(blocks)))
        self.transition_b = conv_bn_relu(c // 2, c // 2, 1) if transition else nn.Identity()
        self.gate = nn.Conv2d(c, c, 1) if attention else None  # CSPNeXt: channel attention on the join
        self.transition = conv_bn_relu(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = x.chunk(2, dim=1)
        xb = self.transition_b(self.blocks(xb))
        y = torch.cat([xs, xb], 1)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        return self.transition(y)


class RepBlock(nn.Module):
    """RepVGG-style block (rule 10): conv 3x3 + conv 1x1 + identity BN, summed, then ReLU;
    ``reparameterize()`` fuses the branches into one 3x3 convolution, in place, as timm does."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_kxk = conv_bn(c, c, 3)
        self.conv_1x1 = conv_bn(c, c, 1)
        self.identity = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        return self.act(self.conv_kxk(x) + self.conv_1x1(x) + self.identity(x))

    def reparameterize(self) -> None:
        c = self.identity.num_features
        identity = torch.zeros(c, c, 3, 3)
        identity[range(c), range(c), 1, 1] = 1.0
        kernel, bias = torch.zeros(c, c, 3, 3), torch.zeros(c)
        for weight, bn in (
            (self.conv_kxk[0].weight, self.conv_kxk[1]),
            (F.pad(self.conv_1x1[0].weight, [1, 1, 1, 1]), self.conv_1x1[1]),
            (identity, self.identity),
        ):
            std = (bn.running_var + bn.eps).sqrt()
            kernel = kernel + weight * (bn.weight / std).reshape(-1, 1, 1, 1)
            bias = bias + bn.bias - bn.running_mean * bn.weight / std
        self.reparam_conv = nn.Conv2d(c, c, 3, padding=1)
        self.reparam_conv.weight.data, self.reparam_conv.bias.data = kernel.detach(), bias.detach()
        del self.conv_kxk, self.conv_1x1, self.identity


class MixedConv(nn.Module):
    """MixNet's split convolution: channel split -> one conv per slice -> concatenation; with
    ``act`` each slice ends in a ReLU (a real Inception-like module, not a linear layer)."""

    def __init__(self, c: int, act: bool = False) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c // 2, c // 2, k, padding=k // 2) for k in (3, 5))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = torch.split(x, self.convs[0].in_channels, 1)
        parts = [conv(halves[i]) for i, conv in enumerate(self.convs)]
        return torch.cat([torch.relu(p) for p in parts] if self.act else parts, 1)


class MixedInvertedResidual(nn.Module):
    """A stride-2 inverted residual (no shortcut) with a split convolution followed by its own
    SE-like gate (rule 11): the block is already attended."""

    def __init__(self, c: int, act: bool = True) -> None:
        super().__init__()
        self.conv_pw = conv_bn_relu(c, 2 * c, 1)
        self.conv_dw = MixedConv(2 * c, act=act)
        self.gate = nn.Conv2d(2 * c, 2 * c, 1)
        self.conv_pwl = conv_bn(2 * c, c, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(self.conv_pw(x))
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        return self.conv_pwl(y)


class PoolMixer(nn.Module):
    """PoolFormer-style token mixer under a layer scale (rule 1 and 10). ``norm="affine"``:
    ``x * res_scale + ls * (pool(norm(x)) - norm(x))``; ``"plain"``: the same with a norm without
    weights and no ``res_scale``; both are residual branches. ``None``: the bare
    ``x + ls * (pool(x) - x)`` is one linear layer."""

    def __init__(self, c: int, norm: str | None = "affine") -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, c, affine=norm == "affine") if norm else nn.Identity()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 0.1))
        self.res_scale = nn.Parameter(torch.ones(c, 1, 1)) if norm == "affine" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        shortcut = x if self.res_scale is None else x * self.res_scale
        return shortcut + self.layer_scale * (self.pool(y) - y)


class PermutedScale(nn.Module):
    """EdgeNeXt's conv block: channels-last MLP, layer scale, then a permute back before the
    sum (rule 1: the SE squeezes the MLP's output, before the layer scale)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class UNetLike(nn.Module):
    """A U-Net level: encoder, pooled deeper level, upsampled and joined with the skip
    (rule 12: a fusion, not a dense or inception site)."""

    def __init__(self, c: int, transpose: bool = False) -> None:
        super().__init__()
        self.enc = conv_bn_relu(c, c)
        self.deep = nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(c, 2 * c), conv_bn_relu(2 * c, 2 * c))
        self.up = nn.ConvTranspose2d(2 * c, c, 2, 2) if transpose else nn.Upsample(scale_factor=2)
        self.dec = conv_bn_relu(c + (c if transpose else 2 * c), c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        return self.dec(torch.cat([self.up(self.deep(skip)), skip], 1))


class DeepLabDecoder(nn.Module):
    """DeepLabV3+-style decoder: deep features interpolated to the low-level size, joined with
    a projected skip (rule 12)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.low = conv_bn_relu(c, c)
        self.deep = nn.Sequential(conv_bn_relu(c, c, stride=2), conv_bn_relu(c, c, stride=2))
        self.project = conv_bn_relu(c, c // 2, 1)
        self.head = conv_bn_relu(c + c // 2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(x)
        deep = F.interpolate(self.deep(low), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([deep, self.project(low)], 1))


class DetectHead(nn.Module):
    """Box and class predictions of one level concatenated as the model's output (rule 12)."""

    def __init__(self, c: int, classes: int = 3) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, c)
        self.box = nn.Sequential(conv_bn_relu(c, c), nn.Conv2d(c, 4, 1))
        self.cls = nn.Sequential(conv_bn_relu(c, c), nn.Conv2d(c, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)
        return torch.cat([self.box(f), self.cls(f)], 1)


class OSA(nn.Module):
    """VoVNet's one-shot aggregation: a chain of layers, all concatenated once (rule 3)."""

    def __init__(self, c: int, mid: int, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(conv_bn_relu(c if i == 0 else mid, mid) for i in range(layers))
        self.concat = conv_bn_relu(c + layers * mid, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return self.concat(torch.cat(outputs, 1))


class Stage(nn.Module):
    """A stage module (not a container) holding blocks as direct children, only the second
    with attention: the first block's site stays (a sibling's SE is not its own)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.plain = Residual(c)
        self.attended = Gated(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attended(self.plain(x))


class TwoTowers(nn.Module):
    """Two deep towers of one input joined by a concatenation: every input lies far from the
    fork, so the join is a fusion of distant features (rule 12), not an Inception module."""

    def __init__(self, c: int, depth: int = 3) -> None:
        super().__init__()
        self.left = nn.Sequential(*(conv_bn_relu(c, c) for _ in range(depth)))
        self.right = nn.Sequential(*(conv_bn_relu(c, c, 1) for _ in range(depth)))
        self.head = conv_bn_relu(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.left(x), self.right(x)], 1))


# --------------------------------------------------------------------------------------------
# Parts that do not trace, kept as opaque calls (placement rules 4 and 13)


class SamePaddedConv(nn.Module):
    """TF-style "SAME" padding computed with ``int()`` on the input's shape (transformers'
    MobileNetV2ConvLayer does this): symbolic tracing fails, so its parent keeps it as one call."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        size = int(x.shape[-1])  # TypeError on a Proxy
        pad = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        x = self.bn(self.conv(F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))))
        return x if self.act is None else self.act(x)


class OpaqueInvertedResidual(nn.Module):
    """``x + reduce(depthwise(expand(x)))`` where every layer is an opaque call."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.expand = SamePaddedConv(c, 2 * c, 1)
        self.depthwise = SamePaddedConv(2 * c, 2 * c, 3)
        self.reduce = SamePaddedConv(2 * c, c, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.reduce(self.depthwise(self.expand(x)))


class OpaqueNet(nn.Module):
    """A stem and two inverted residuals built only from parts that do not trace."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = SamePaddedConv(3, c, 3, 2)
        self.blocks = nn.Sequential(OpaqueInvertedResidual(c), OpaqueInvertedResidual(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class ScrambledReduce(SamePaddedConv):
    """An opaque part whose output keeps the conv's shape but not its layout (an einsum moves
    the channels): with channels = height = width nothing but sizes would say where they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw->bhwc", super().forward(x))


class OpaqueAmbiguous(nn.Module):
    """``x + scrambled(x)`` (``expand``: ``x + scrambled(expand(x))``): the channel axis of the
    branch is not known, even where the branch has the shape of its input."""

    def __init__(self, c: int, expand: bool = True) -> None:
        super().__init__()
        self.expand = SamePaddedConv(c, 2 * c, 1) if expand else nn.Identity()
        self.reduce = ScrambledReduce(2 * c if expand else c, c, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.reduce(self.expand(x))


def perturb_se(model: nn.Module) -> None:
    """Move every inserted SE block off identity (seeded), so that outputs show whether its
    weights were kept: an identity-start block passes any round trip trivially."""
    from se_inject import SEBlock

    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SEBlock):
                for p in m.parameters():
                    p.add_(torch.randn_like(p))


def force_rebuild(monkeypatch) -> None:
    """Plan every site as rebuilt (no attaching, no placeholders): for the tests of what a
    rebuilt block must keep, on nets whose branches end in modules."""
    import se_inject.sites.driver as driver

    monkeypatch.setattr(driver, "attach_point", lambda *args, **kwargs: None)
    monkeypatch.setattr(driver, "has_placeholder", lambda *args, **kwargs: False)


def se_inputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``model`` on ``x`` (no grad) and return its output and the input each SE block
    received, by module name: where a test sees what every SE block scales."""
    from se_inject import SEBlock

    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[0]))
        for name, m in model.named_modules()
        if isinstance(m, SEBlock)
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen
