"""The convolutional decoder: latents [B, in_channels, h, w] -> image [B, C, h*f, w*f] (or the parameters of a
pixel likelihood, `out_channels` of them), the encoder in reverse."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.config import AutoencoderConfig
from vqtok.nn.blocks import AttnBlock, Level, MidBlock, ResBlock, Upsample, cpu_layout, group_norm
from vqtok.nn.conditioning import LabelEmbedding


class Decoder(nn.Module):
    """conv_in, mid block, one `Level` per entry of channel_mult from the deepest up (num_res_blocks + 1 residual
    blocks each, upsampling between levels), norm, conv_out. `levels[i]` works at the width of channel_mult[i],
    as in taming's `up[i]`. A class-conditional config (num_classes > 0) adds `label_embedding` (as wide as the
    deepest level) to conv_in's output, before the mid block."""

    def __init__(self, config: AutoencoderConfig, in_channels: int, out_channels: int | None = None):
        super().__init__()
        c = config
        widths = [c.base_channels * m for m in c.channel_mult]
        n = len(widths)
        width = widths[-1]
        size = c.resolution // c.downsampling_factor
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.label_embedding = LabelEmbedding(c.num_classes, width) if c.num_classes else None
        self.mid = MidBlock(width, groups=c.norm_groups, dropout=c.dropout, attention=c.mid_attention)
        levels: list[Level] = [None] * n  # type: ignore[list-item]
        for i in reversed(range(n)):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(width, widths[i], groups=c.norm_groups, dropout=c.dropout))
                attns.append(AttnBlock(widths[i], groups=c.norm_groups) if size in c.attn_resolutions else nn.Identity())
                width = widths[i]
            levels[i] = Level(blocks, attns, Upsample(width) if i > 0 else nn.Identity())
            size *= 2 if i > 0 else 1
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(width, c.norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels or c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`labels` LongTensor [B] for a conditional decoder (None: the null label, as for an unconditional one)."""
        h = self.conv_in(cpu_layout(z))
        if self.label_embedding is not None:
            h = self.label_embedding(h, labels)
        h = self.mid(h)
        for level in reversed(self.levels):
            h = level(cpu_layout(h))
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()
