"""Models and steps shared by the multi-process scripts and the single-process references they are compared to."""

import torch

from tests.conftest import tiny_config
from vqtok import Autoencoder
from vqtok.config import VQConfig


def batch() -> torch.Tensor:
    return torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(123)) * 2 - 1


def ema_model() -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(tiny_config(VQConfig(codebook_size=32, dim=4, kmeans_init=False, dead_threshold=0.0))).train()


def kmeans_restart_model() -> Autoencoder:
    torch.manual_seed(1)
    config = VQConfig(codebook_size=64, dim=4, kmeans_samples=128, dead_threshold=0.9, decay=0.5)
    return Autoencoder(tiny_config(config)).train()


def train_step(module, model: Autoencoder, x: torch.Tensor) -> dict:
    """Forward (through DDP when given), backward, SGD step, then the once-per-step bottleneck hook."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = module(x)
    ((out.reconstruction - x).pow(2).mean() + out.loss).backward()
    optimizer.step()
    return model.on_optimizer_step()
