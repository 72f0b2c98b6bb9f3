"""LPIPS, the learned perceptual image distance (Zhang et al. 2018), VGG16 variant: the perceptual term of VQGAN.

Both images go through VGG16's convolutional layers; at the five ReLUs before each pooling (relu1_2 ... relu5_3)
the features are unit-normalised over channels, their squared difference is weighted per channel by LPIPS'
non-negative linear heads, averaged over positions, and the five layers are summed: one distance per image.

vqtok downloads and ships no weights. `LPIPS.from_file` reads one safetensors file holding this module's tensors
(`features.N.*`: torchvision's `vgg16().features`; `heads.N.weight`: LPIPS' `linN.model.1.weight`), which
`vqtok convert-lpips` (`convert_lpips_weights`) makes from the published files. The module is frozen: it is a loss,
not a model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from vqtok.config import LPIPS_MIN_SIZE
from vqtok.hub import load_weights_strict

# LPIPS' input scaling: images in [-1, 1] are shifted and scaled to the statistics VGG16 was trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features
WIDTHS = (64, 128, 256, 512, 512)
VGG16 = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` up to relu5_3, layer for layer (same indices, so the same state-dict keys),
    without building the 120 M-parameter classifier that LPIPS does not use."""
    layers: list[nn.Module] = []
    width = 3
    for item in VGG16:
        if item == "pool":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(width, item, 3, padding=1), nn.ReLU()]
            width = item
    return nn.Sequential(*layers)


def lpips_state_dict(vgg: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This module's tensors from torchvision's VGG16 state dict (`features.N.weight/bias`; its classifier is
    dropped) and LPIPS' linear heads (`linN.model.1.weight`, as in its v0.1 `vgg.pth`)."""
    state = {k: v for k, v in vgg.items() if k.startswith("features.") and int(k.split(".")[1]) <= TAPS[-1]}
    for i in range(len(WIDTHS)):
        key = f"lin{i}.model.1.weight"
        if key not in heads:
            raise KeyError(f"LPIPS heads: '{key}' is missing (found {sorted(heads)[:6]})")
        state[f"heads.{i}.weight"] = heads[key]
    return state


class LPIPS(nn.Module):
    """d(x, y) per image [B] for images [B, C, H, W] in [-1, 1] (C = 1 is repeated to RGB). Not trainable."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(width, 1, 1, bias=False) for width in WIDTHS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "LPIPS":
        """Read the weights strictly (every tensor present, nothing else, right shapes, finite) from safetensors."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights not found: {path} (make them with vqtok convert-lpips)")
        model = cls().to(map_location)
        load_weights_strict(model, path, map_location=map_location)
        if any((head.weight < 0).any() for head in model.heads):
            raise ValueError(f"{path}: LPIPS' linear heads must be non-negative (a distance); these are not")
        return model

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval: no dropout, and nothing to train

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS compares two batches of images [B, 1 or 3, H, W] of one shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {LPIPS_MIN_SIZE} pixels a side (VGG16 halves them four "
                             f"times), got {x.shape[-2]}x{x.shape[-1]}")
        batch = x.shape[0]
        h = (torch.cat([x, y]).expand(-1, 3, -1, -1) - self.shift) / self.scale  # one pass for both
        distance = torch.zeros(batch, device=x.device, dtype=torch.float32)
        taps = iter(zip(TAPS, self.heads))
        tap, head = next(taps)
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index == tap:
                f = h.float() / (h.float().pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                fx, fy = f[:batch], f[batch:]
                distance = distance + head((fx - fy).pow(2)).mean(dim=(1, 2, 3))
                tap, head = next(taps, (None, None))
        return distance


def installed_lpips_heads() -> Path:
    """The v0.1 VGG heads (`vgg.pth`) that the installed `lpips` package ships, for when none is named."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("LPIPS heads: give the v0.1 vgg.pth (--heads); the lpips package, which ships it, "
                                "is not installed")
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS heads: the lpips package has no {path}; give the v0.1 vgg.pth (--heads)")
    return path


def convert_lpips_weights(vgg: str | Path, out: str | Path, heads: str | Path | None = None) -> int:
    """Write the safetensors file that `LPIPS.from_file` (and a config's `perceptual.weights`) reads, from the
    published files; returns the number of tensors written.

    Args:
        vgg: torchvision's ImageNet VGG16 weights, `vgg16-397923af.pth` (its classifier is left out).
        out: the safetensors file to write: it must not exist, and it is renamed into place only once it loads
            strictly, so a failed conversion leaves nothing behind.
        heads: LPIPS' v0.1 linear heads, `vgg.pth`; by default the installed `lpips` package's copy.

    Both inputs are read with `torch.load(weights_only=True)`, which restores tensors and never runs pickled code.
    Neither is downloaded: vqtok ships and fetches no weights.
    """
    from safetensors.torch import save_file

    from vqtok.files import staged

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: exists; convert-lpips writes a new file (remove it or choose another name)")
    vgg_state = torch.load(vgg, map_location="cpu", weights_only=True)
    heads_state = torch.load(heads or installed_lpips_heads(), map_location="cpu", weights_only=True)
    state = {k: v.contiguous() for k, v in lpips_state_dict(vgg_state, heads_state).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out) as tmp:  # renamed onto `out` only once it loads strictly
        save_file(state, tmp)
        LPIPS.from_file(tmp)
    return len(state)
