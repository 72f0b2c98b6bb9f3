"""Shared, session-scoped fixtures: tiny configs and models built once, and the shared datasets' location."""

from __future__ import annotations

import os
from pathlib import Path

# This CPU advertises AMX but the VM does not enable it: oneDNN's bf16 kernels then die with SIGILL. Cap the ISA
# (before torch initialises oneDNN; subprocesses inherit it). Harmless elsewhere: it only excludes AMX kernels.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import pytest  # noqa: E402
import torch  # noqa: E402

from vqtok import Autoencoder, AutoencoderConfig, GaussianConfig, VQConfig

DATASETS = Path(os.environ.get("VQTOK_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))


def tiny_config(bottleneck, **overrides) -> AutoencoderConfig:
    """A two-level (f = 2) model small enough for CPU tests, with attention at the 8x8 level."""
    base = dict(
        in_channels=3,
        resolution=16,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        latent_channels=8,
        norm_groups=8,
        bottleneck=bottleneck,
    )
    base.update(overrides)
    return AutoencoderConfig(**base)


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height grey pixels, followed by one row of data: all PIL reads before it
    refuses a decompression bomb, so a 20000x20000 "image" costs a few bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (width + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def vq_config() -> AutoencoderConfig:
    return tiny_config(VQConfig(codebook_size=32, dim=4, kmeans_samples=64))


@pytest.fixture(scope="session")
def gaussian_config() -> AutoencoderConfig:
    return tiny_config(GaussianConfig(dim=4))


@pytest.fixture(scope="session")
def vq_model(vq_config) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(vq_config).eval()


@pytest.fixture(scope="session")
def gaussian_model(gaussian_config) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(gaussian_config).eval()


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """A fixed batch of 4 RGB 16x16 images in [-1, 1]."""
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture
def fresh(request):
    """A fresh copy of a session model, for tests that change state."""
    import copy

    return lambda model: copy.deepcopy(model)


MNIST = DATASETS / "mnist"


@pytest.fixture(scope="session")
def mnist_tokenizer_run(tmp_path_factory) -> Path:
    """A short real tokenizer run on MNIST (150 steps, batch 32, 4,800 images; f = 4 with 64 codes, ~26 s), shared
    by the training test that checks its PSNR and the prior test that trains on its codes."""
    if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found under {MNIST}")
    from vqtok.config import DataConfig, TrainConfig
    from vqtok.train import train

    out = tmp_path_factory.mktemp("mnist") / "tokenizer_run"
    model = AutoencoderConfig(
        in_channels=1, resolution=28, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=16,
        norm_groups=8, bottleneck=VQConfig(codebook_size=64, dim=8, kmeans_samples=1024),
    )
    config = TrainConfig(
        model=model, output_dir=str(out), max_steps=150, batch_size=32, lr=2e-3, warmup_steps=10,
        data=DataConfig(source="idx", path=str(MNIST / "train-images-idx3-ubyte.gz"), limit=4800),
        eval_data=DataConfig(source="idx", path=str(MNIST / "t10k-images-idx3-ubyte.gz"), limit=500),
        eval_every=150, eval_images=500, checkpoint_every=150, log_every=50, num_workers=0,
    )
    train(config)
    return out
