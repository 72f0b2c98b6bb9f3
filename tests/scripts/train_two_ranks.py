"""Run under `torchrun --nproc_per_node 2`: a few training steps of the tiny config with `vqtok.train`, then save
the quantizer's state and the world size seen (compared with one process by tests/test_train.py). With GAN=1 the
run has a PatchGAN from its second step, whose weights are saved per rank too (tests/test_vqgan.py); with HVAE=1 it
trains the tiny hierarchical VAE instead (tests/test_vae_training.py)."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from tests.scripts.common import WORLD_INVARIANT_VQ, tiny_hvae_train_config, tiny_train_config  # noqa: E402
from vqtok.config import AdversarialConfig, DiscriminatorConfig  # noqa: E402
from vqtok.train import loop  # noqa: E402

out = Path(sys.argv[1])
HFLIP = os.environ.get("HFLIP", "1") == "1"
GAN = os.environ.get("GAN", "0") == "1"
HVAE = os.environ.get("HVAE", "0") == "1"  # the tiny hierarchical VAE instead (tests/test_vae_training.py)
seen = {}
original = loop._export


def capture(accelerator, raw, ema, image_losses, *args, **kwargs):
    seen["world"] = accelerator.num_processes
    rank = accelerator.process_index
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    if image_losses is not None and image_losses.discriminator is not None:
        save_file({k: v.contiguous() for k, v in image_losses.raw.state_dict().items()},
                  str(out / f"discriminator_rank{rank}.safetensors"))
    return original(accelerator, raw, ema, image_losses, *args, **kwargs)


loop._export = capture
adversarial = AdversarialConfig(discriminator=DiscriminatorConfig(in_channels=1, channels=8, layers=1), start_step=1)
if HVAE:
    loop.train(tiny_hvae_train_config(str(out / "run"), max_steps=4, hflip=HFLIP))
else:
    loop.train(tiny_train_config(str(out / "run"), vq=WORLD_INVARIANT_VQ, max_steps=4, hflip=HFLIP,
                                 adversarial=adversarial if GAN else None))
(out / f"world{os.environ['RANK']}.json").write_text(json.dumps(seen))
