"""The layers the encoder and decoder are made of, in the kinds used by VQGAN (taming-transformers) and diffusers.

Each layer holds the same tensors as its counterpart there (GroupNorm with eps 1e-6, 3x3 convolutions, 1x1
convolutions for attention projections and channel-changing shortcuts, strided-conv downsampling with (0, 1, 0, 1)
padding, nearest-neighbour upsampling followed by a 3x3 convolution), so their checkpoints map onto these modules
key by key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) twice, with a 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all positions, residual, through F.scaled_dot_product_attention."""

    def __init__(self, channels: int, *, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        h = self.norm(x)
        q, k, v = (rearrange(conv(h), "b c h w -> b 1 (h w) c") for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve the spatial size with a stride-2 3x3 convolution after padding right and bottom by one."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """The bottom of the U: residual block, optional attention, residual block."""

    def __init__(self, channels: int, *, groups: int, dropout: float, attention: bool):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups=groups, dropout=dropout)
        self.attn = AttnBlock(channels, groups=groups) if attention else nn.Identity()
        self.res2 = ResBlock(channels, channels, groups=groups, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, each optionally followed by attention, then a
    resampling step (or none at the last level)."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, attn in zip(self.blocks, self.attns):
            x = attn(block(x))
        return self.resample(x)
