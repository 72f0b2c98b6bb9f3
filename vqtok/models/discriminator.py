"""The PatchGAN discriminator of the VQGAN recipe (Isola et al. 2017; taming-transformers' NLayerDiscriminator).

It scores overlapping patches of an image as real or reconstructed: one logit per patch, [B, 1, h', w']. A
training run saves it beside the tokenizer (`discriminator/`, config.json + model.safetensors, in the Hub format)
so that fine-tuning can start from it (`adversarial.init_from`); the tokenizer never needs it.
"""

from __future__ import annotations

import torch
from torch import nn

from vqtok.config import DiscriminatorConfig
from vqtok.hub import HubModel


class PatchDiscriminator(HubModel, model_type="patch_discriminator"):
    """Stride-2 4x4 convolutions that double the width (capped at 8x), BatchNorm and LeakyReLU(0.2) between,
    ending in a 4x4 convolution to one logit per patch. With `layers` = 3 on 256x256 images each logit sees a
    70x70 patch."""

    config_class = DiscriminatorConfig

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        c, n = config.channels, config.layers
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = c
        for i in range(1, n + 1):  # n - 1 more stride-2 convolutions, then one at stride 1
            out = c * min(2**i, 8)
            layers += [nn.Conv2d(width, out, 4, stride=2 if i < n else 1, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    @property
    def min_size(self) -> int:
        """The smallest image side that still leaves one patch: n halvings, then two 4x4 convolutions (-1 each)."""
        return 2 ** self.config.layers * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] (the tokenizer's range) -> patch logits [B, 1, h', w'] (at least float32)."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"the discriminator expects images [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"images of {x.shape[-2]}x{x.shape[-1]} are too small for a {self.config.layers}-layer "
                             f"discriminator (at least {self.min_size} per side): use fewer layers")
        logits = self.layers(x)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _init_weights(module: nn.Module) -> None:
    """pix2pix's initialisation: convolutions N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
