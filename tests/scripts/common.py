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


def tiny_train_config(output_dir: str, *, vq: VQConfig | None = None, **overrides):
    """A few-second training run on the built-in digits (resized to 16x16) with a tiny VQ model."""
    from vqtok.config import DataConfig, PreprocessConfig, TrainConfig

    model = tiny_config(
        vq or VQConfig(codebook_size=16, dim=4, kmeans_samples=64), in_channels=1, base_channels=8, norm_groups=4,
        attn_resolutions=(), preprocess=PreprocessConfig(resize=16),
    )
    settings = dict(model=model, data=DataConfig(source="digits", limit=256), output_dir=output_dir, max_steps=6,
                    batch_size=16, lr=1e-3, warmup_steps=2, eval_every=3, eval_images=32, checkpoint_every=3,
                    log_every=1, num_workers=0)
    settings.update(overrides)
    return TrainConfig(**settings)


# k-means draws its reservoir on each rank and restarts draw rank-local candidates, so runs with different world
# sizes start from different codebooks; equality with one process is checked with both off (agreement of k-means and
# restarts across ranks is tested in tests/test_distributed.py).
WORLD_INVARIANT_VQ = VQConfig(codebook_size=16, dim=4, kmeans_init=False, dead_threshold=0.0)
