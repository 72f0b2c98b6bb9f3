"""The latent space of a model, as the one small interface that interpolation and latent arithmetic work in.

A `LatentSpace` encodes images into latents - a list of tensors, one per latent group, each [B, ...] - and decodes
such latents back into images; `value_range` is the range of the images both take and give. `latent_space(model)`
gives the space of a vqtok model:

- a Gaussian `Autoencoder`: the posterior mean q(z | x), one group [B, dim, h, w];
- a VQ (or FSQ, LFQ, residual VQ) `Autoencoder`: the encoder's continuous features before quantization, one group [B, dim, h,
  w]. Decoding quantizes them first (the bottleneck's `encode`: VQ's exact nearest-code search, l2-normalised where
  the codebook is; FSQ's bound and rounding; LFQ's signs; residual VQ's levels) and decodes
  the codes, so whatever latents are decoded - an interpolated or shifted point included - the image is that of a real
  code grid;
- a `HierarchicalVAE`: the posterior mean of every group, top first (each conditioned on the means above it, as
  `HierarchicalVAE.encode` gives them), decoded through the model's top-down path.

Anything else with `encode`, `decode` and `value_range` (a test double, another library's model behind an adapter) is
accepted wherever a model is. A space may also name the interpolation that suits it (`default_method`, see
`vqtok.latents.interpolation`).

Labels: class-conditional autoencoders (config.num_classes > 0) take `labels` (None: the null label, the
unconditional pass; an int; or one per image); a model that is not conditional refuses labels that are not None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from vqtok.nn.conditioning import Labels, label_arguments


@runtime_checkable
class LatentSpace(Protocol):
    """What interpolation and latent arithmetic need of a model: images <-> a list of latent groups."""

    value_range: tuple[float, float]
    """The range of the images `encode` takes and `decode` gives (e.g. (-1, 1) or (0, 1))."""

    def encode(self, x: torch.Tensor, labels: Labels = None) -> list[torch.Tensor]:
        """Images [B, C, H, W] in `value_range` -> latents: one tensor [B, ...] per group."""
        ...

    def decode(self, latents: Sequence[torch.Tensor], labels: Labels = None) -> torch.Tensor:
        """Latents (one tensor [B, ...] per group) -> images [B, C, H, W] in `value_range`."""
        ...


class ModelLatents:
    """What the spaces of vqtok models share: the model, its image range and device, and the label check."""

    default_method = "slerp"
    groups = 1

    def __init__(self, model: Any):
        self.model = model

    @property
    def value_range(self) -> tuple[float, float]:
        return tuple(self.model.config.value_range)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _checked(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The latents as a list of `groups` tensors on the model's device."""
        if not isinstance(latents, (list, tuple)) or len(latents) != self.groups:
            got = f"{len(latents)} tensor(s)" if isinstance(latents, (list, tuple)) else type(latents).__name__
            raise ValueError(f"{type(self).__name__} decodes a list of {self.groups} latent tensor(s), one per group; "
                             f"got {got}")
        return [z.to(self.device) for z in latents]


class GaussianLatents(ModelLatents):
    """A Gaussian autoencoder's latents: the posterior mean [B, dim, h, w] (one group). Slerp is its default
    interpolation (the prior is N(0, I))."""

    def encode(self, x: torch.Tensor, labels: Labels = None) -> list[torch.Tensor]:
        return [self.model.encode(x.to(self.device), **label_arguments(self.model, labels)).mean]

    def decode(self, latents: Sequence[torch.Tensor], labels: Labels = None) -> torch.Tensor:
        return self.model.decode(self._checked(latents)[0], **label_arguments(self.model, labels))


class VQFeatures(ModelLatents):
    """A VQ tokenizer's continuous encoder features before quantization [B, dim, h, w] (one group); `decode`
    quantizes them (`quantize`) and decodes the codes. Linear interpolation is its default: the features are not
    N(0, I) latents, and their norms are part of what the nearest-code search compares."""

    default_method = "linear"

    def encode(self, x: torch.Tensor, labels: Labels = None) -> list[torch.Tensor]:
        return [self.model.encode(x.to(self.device), return_dict=True, **label_arguments(self.model, labels)).latents]

    def quantize(self, features: torch.Tensor) -> torch.Tensor:
        """Features [B, dim, h, w] -> the codes [B, h, w] of their nearest code vectors ([B, h, w, depth] for a
        residual VQ; the bottleneck's exact search, the one `encode` runs)."""
        return self.model.bottleneck.encode(features.to(self.device))

    def decode(self, latents: Sequence[torch.Tensor], labels: Labels = None) -> torch.Tensor:
        return self.model.decode(self.quantize(self._checked(latents)[0]), **label_arguments(self.model, labels))


class HierarchicalLatents(ModelLatents):
    """A hierarchical VAE's latents: the posterior mean of every group, top first. Unconditional (no labels)."""

    @property
    def groups(self) -> int:  # type: ignore[override]
        return self.model.config.num_groups

    def encode(self, x: torch.Tensor, labels: Labels = None) -> list[torch.Tensor]:
        label_arguments(self.model, labels)  # refuses labels
        return [q.mean for q in self.model.encode(x.to(self.device))]

    def decode(self, latents: Sequence[torch.Tensor], labels: Labels = None) -> torch.Tensor:
        label_arguments(self.model, labels)
        return self.model.decode(self._checked(latents))


def latent_space(model: Any) -> LatentSpace:
    """The latent space of a vqtok model (a Gaussian or VQ `Autoencoder`, a `HierarchicalVAE`; see the module
    docstring), or `model` itself when it already is a `LatentSpace`."""
    from vqtok.models import Autoencoder, HierarchicalVAE

    if isinstance(model, Autoencoder):
        return GaussianLatents(model) if model.is_gaussian else VQFeatures(model)
    if isinstance(model, HierarchicalVAE):
        return HierarchicalLatents(model)
    if isinstance(model, LatentSpace):
        return model
    raise TypeError(f"no latent space for a {type(model).__name__}: give an Autoencoder, a HierarchicalVAE, or an "
                    "object with encode(x, labels), decode(latents, labels) and value_range (a LatentSpace)")


def float64_cpu(t: torch.Tensor) -> torch.Tensor:
    """A detached float64 copy on the CPU, where sums and angles are computed (every device's tensors, MPS's too)."""
    return t.detach().to("cpu", torch.float64)
