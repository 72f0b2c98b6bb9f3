"""Bottlenecks: one interface (`Bottleneck`), several implementations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqtok.bottleneck.base import Bottleneck, BottleneckOutput
from vqtok.bottleneck.fsq import FiniteScalarQuantizer, FSQConfig
from vqtok.bottleneck.gaussian import DiagonalGaussian, GaussianBottleneck, image_noise
from vqtok.bottleneck.lfq import LFQConfig, LookupFreeQuantizer
from vqtok.bottleneck.rvq import ResidualVectorQuantizer, RVQConfig
from vqtok.bottleneck.search import nearest_code
from vqtok.bottleneck.vq import VectorQuantizer
from vqtok.config import GaussianConfig, VQConfig

if TYPE_CHECKING:  # defined at the end of vqtok.config, which imports this package while it loads
    from vqtok.config import BottleneckConfig


def build_bottleneck(config: BottleneckConfig) -> Bottleneck:
    """The bottleneck a config describes."""
    if isinstance(config, GaussianConfig):
        return GaussianBottleneck(config)
    if isinstance(config, RVQConfig):  # (before VQConfig: an RVQConfig is a VQConfig with levels)
        return ResidualVectorQuantizer(config)
    if isinstance(config, VQConfig):
        return VectorQuantizer(config)
    if isinstance(config, FSQConfig):
        return FiniteScalarQuantizer(config)
    if isinstance(config, LFQConfig):
        return LookupFreeQuantizer(config)
    raise TypeError(f"unknown bottleneck config {type(config).__name__}")


__all__ = [
    "Bottleneck",
    "BottleneckOutput",
    "DiagonalGaussian",
    "FSQConfig",
    "FiniteScalarQuantizer",
    "GaussianBottleneck",
    "LFQConfig",
    "LookupFreeQuantizer",
    "RVQConfig",
    "ResidualVectorQuantizer",
    "VectorQuantizer",
    "build_bottleneck",
    "image_noise",
    "nearest_code",
]
