"""The convolutional encoder: image [B, C, H, W] -> features [B, out_channels, H/f, W/f], f = 2 ** (levels - 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.config import AutoencoderConfig
from vqtok.nn.blocks import AttnBlock, Downsample, Level, MidBlock, ResBlock, cpu_layout, group_norm
from vqtok.nn.conditioning import LabelEmbedding


class Encoder(nn.Module):
    """conv_in, one `Level` per entry of channel_mult (downsampling between levels), mid block, norm, conv_out.

    A class-conditional config (num_classes > 0) adds `label_embedding` (base_channels wide) to conv_in's output."""

    def __init__(self, config: AutoencoderConfig, out_channels: int):
        super().__init__()
        c = config
        widths = [c.base_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)
        self.label_embedding = LabelEmbedding(c.num_classes, c.base_channels) if c.num_classes else None
        levels, size, width = [], c.resolution, c.base_channels
        for i, out_width in enumerate(widths):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(width, out_width, groups=c.norm_groups, dropout=c.dropout))
                attns.append(AttnBlock(out_width, groups=c.norm_groups) if size in c.attn_resolutions else nn.Identity())
                width = out_width
            last = i == len(widths) - 1
            levels.append(Level(blocks, attns, nn.Identity() if last else Downsample(width)))
            size //= 1 if last else 2
        self.levels = nn.ModuleList(levels)
        self.mid = MidBlock(width, groups=c.norm_groups, dropout=c.dropout, attention=c.mid_attention)
        self.norm_out = group_norm(width, c.norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`labels` LongTensor [B] for a conditional encoder (None: the null label, as for an unconditional one)."""
        h = self.conv_in(cpu_layout(x))
        if self.label_embedding is not None:
            h = self.label_embedding(h, labels)
        for level in self.levels:
            h = level(cpu_layout(h))
        h = self.mid(cpu_layout(h))
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()
