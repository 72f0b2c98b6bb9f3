"""The layers the encoder and decoder are made of, in the kinds used by VQGAN (taming-transformers) and diffusers.

Each layer holds the same tensors as its counterpart there (GroupNorm with eps 1e-6, 3x3 convolutions, 1x1
convolutions for attention projections and channel-changing shortcuts, strided-conv downsampling with (0, 1, 0, 1)
padding, nearest-neighbour upsampling followed by a 3x3 convolution), so their checkpoints map onto these modules
key by key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# On the CPU, oneDNN's convolutions run large feature maps faster channels-last (NCHW activations are reordered on
# every call) and small ones faster in NCHW (channels-last reorders the weights on every call, and at 16x16 they
# outweigh the activations). Measured on 2 AVX-512 cores (BENCHMARKS.md, scripts/bench_pretrained.py): encoders and
# decoders of SD-VAE/VQGAN size run 7-15% faster at 256x256 than in NCHW throughout, and keeping the maps below 64x64
# in NCHW gains another 2-5% at 128x128 over channels-last throughout. Decided by positions per image, so an image's
# result does not depend on the batch it is in.
CHANNELS_LAST_MIN_POSITIONS = 64 * 64


def cpu_layout(x: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """x in the memory format a convolution of it (of it upsampled `scale` times) runs fastest in on the CPU: the same
    values; elsewhere x itself."""
    if x.device.type != "cpu" or x.ndim != 4:
        return x
    large = x.shape[2] * x.shape[3] * scale**2 >= CHANNELS_LAST_MIN_POSITIONS
    return x.contiguous(memory_format=torch.channels_last if large else torch.contiguous_format)


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
    """Single-head spatial self-attention over all positions, residual, through F.scaled_dot_product_attention.

    The projections are 1x1 convolutions (taming's tensors, [C, C, 1, 1]) applied as matrix products on the
    positions' vectors [B, HW, C]: on the CPU a 1x1 convolution reorders its weight on every call (2 ms for
    C = 512 at 8x8, more than the attention itself), and contiguous q, k, v take SDPA's fused kernel."""

    def __init__(self, channels: int, *, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (_pointwise(conv, h)[:, None] for conv in (self.q, self.k, self.v))  # [B, 1, HW, C]: one head
        out = _pointwise(self.proj, F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(b, c, height, width)


def _pointwise(conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to vectors [..., C_in] -> [..., C_out]."""
    return F.linear(h, conv.weight.flatten(1), conv.bias)


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
        return self.conv(F.interpolate(cpu_layout(x, scale=2), scale_factor=2.0, mode="nearest"))


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
