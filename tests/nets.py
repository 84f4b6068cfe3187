"""Tiny hand-made networks, one per placement rule, shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Residual(nn.Module):
    """``x + branch(x)`` in the spellings DESIGN.md lists, optionally with a projection,
    layer scale, a scalar scale, dropout in the branch or an in-place add."""

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
    ) -> None:
        super().__init__()
        cout = cout or cin
        self.branch = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.ReLU(), conv_bn(cout, cout))
        self.shortcut = conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None
        self.gamma = nn.Parameter(torch.full((cout, 1, 1), 0.5)) if layer_scale else None
        self.scale = scale
        self.spelling = spelling
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
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
