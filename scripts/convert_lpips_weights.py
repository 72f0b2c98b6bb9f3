"""The same as `vqtok convert-lpips` (kept for older notes): make the LPIPS-VGG16 weights file that a config's
`perceptual.weights` names, from torchvision's VGG16 weights and LPIPS' heads. See `vqtok convert-lpips --help`.

    python scripts/convert_lpips_weights.py --vgg vgg16-397923af.pth --out weights/lpips_vgg16.safetensors
"""

import sys

from vqtok.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-lpips", *sys.argv[1:]]))
