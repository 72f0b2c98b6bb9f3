"""Bottlenecks: one interface (`Bottleneck`), several implementations."""

from vqtok.bottleneck.base import Bottleneck, BottleneckOutput
from vqtok.bottleneck.gaussian import DiagonalGaussian, GaussianBottleneck, image_noise
from vqtok.bottleneck.search import nearest_code
from vqtok.bottleneck.vq import VectorQuantizer
from vqtok.config import BottleneckConfig, GaussianConfig, VQConfig


def build_bottleneck(config: BottleneckConfig) -> Bottleneck:
    """The bottleneck a config describes."""
    if isinstance(config, GaussianConfig):
        return GaussianBottleneck(config)
    if isinstance(config, VQConfig):
        return VectorQuantizer(config)
    raise TypeError(f"unknown bottleneck config {type(config).__name__}")


__all__ = [
    "Bottleneck",
    "BottleneckOutput",
    "DiagonalGaussian",
    "GaussianBottleneck",
    "VectorQuantizer",
    "build_bottleneck",
    "image_noise",
    "nearest_code",
]
