"""Make the LPIPS-VGG16 weights file that a config's `perceptual.weights` names, from the published files.

Inputs (neither is downloaded here):
  --vgg   torchvision's ImageNet VGG16 weights, `vgg16-397923af.pth`
          (https://download.pytorch.org/models/vgg16-397923af.pth)
  --heads LPIPS' v0.1 linear heads, `vgg.pth` (in the `lpips` package at lpips/weights/v0.1/vgg.pth, or
          https://github.com/richzhang/PerceptualSimilarity); default: the installed `lpips` package's copy
Both are read with `torch.load(weights_only=True)`, which restores tensors and never runs pickled code. The
output is one safetensors file that `vqtok.nn.perceptual.LPIPS.from_file` loads strictly.

    python scripts/convert_lpips_weights.py --vgg vgg16-397923af.pth --out weights/lpips_vgg16.safetensors
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file

from vqtok.files import staged
from vqtok.nn.perceptual import LPIPS, lpips_state_dict


def installed_heads() -> Path:
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise SystemExit("--heads is required: the lpips package (which ships vgg.pth) is not installed")
    return Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vgg", required=True, type=Path, help="torchvision's vgg16-397923af.pth")
    parser.add_argument("--heads", type=Path, help="LPIPS' v0.1 vgg.pth (default: the lpips package's)")
    parser.add_argument("--out", required=True, type=Path, help="the safetensors file to write")
    args = parser.parse_args(argv)
    vgg = torch.load(args.vgg, map_location="cpu", weights_only=True)
    heads = torch.load(args.heads or installed_heads(), map_location="cpu", weights_only=True)
    state = {k: v.contiguous() for k, v in lpips_state_dict(vgg, heads).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with staged(args.out) as tmp:  # renamed onto --out only once it loads strictly
        save_file(state, tmp)
        LPIPS.from_file(tmp)
    print(f"wrote {args.out} ({len(state)} tensors)")


if __name__ == "__main__":
    main()
