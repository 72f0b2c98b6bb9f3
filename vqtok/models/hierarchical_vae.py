"""A hierarchical VAE: groups of latents at several scales, p(x | z) p(z_L | z_<L) ... p(z_1), with a shared top-down path.

The layout is VDVAE's (Child 2021) with NVAE's residual posterior (Vahdat & Kautz 2020):

    bottom-up    x -> stem -> cells at every resolution, from the image's down to the coarsest latent scale;
                 the features at each latent scale are kept (`acts`)
    top-down     h starts as a learned constant at the coarsest scale. Each latent group l:
                   prior      p(z_l | z_<l) = N(mu_p, sigma_p^2) from h (the first group's is N(0, I))
                   posterior  q(z_l | x, z_<l): mu_q = mu_p + dmu, log sigma_q^2 = log sigma_p^2 + dlogvar, with
                              (dmu, dlogvar) computed from h and acts
                   then       h <- h + prior features + proj(z_l), followed by `cells_per_group` residual cells
                 between scales h is upsampled (nearest) and refined by cells; at the image's size a 3x3
                 convolution gives the pixel likelihood's parameters.

The top-down path is shared: inference (posterior) and generation (prior) run the same modules. The output layers
of every prior and posterior are zero-initialised, so an untrained model has q = p = N(0, I) in every group: the
KL is exactly 0 at initialisation and the first steps cannot blow it up.

Cells are VDVAE's bottleneck blocks (GELU, 1x1 conv to width/4, two 3x3, 1x1 back, residual), with no normalisation
layer: no batch statistics (NVAE's BatchNorm changes between training and evaluation, and differs across processes
and micro-batches), so one process equals several and a resumed run equals an uninterrupted one; depth is tamed by
scaling the last convolution of each residual cell by 1/sqrt(number of cells), as VDVAE does.

Training stability (NVAE #2, #17, VDVAE #25 report NaNs): the KL warm-up of the training config, KL balancing across
groups during it (`kl_balance`), free bits per group, optional spectral regularisation (`spectral_reg` x the sum of
every convolution's largest singular value, computed exactly), the engine's gradient clipping and skipping of
non-finite or huge updates, and an export that refuses non-finite weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.bottleneck import BottleneckOutput, DiagonalGaussian
from vqtok.bottleneck.gaussian import Noise
from vqtok.bottleneck.kl import KLObjective
from vqtok.config import (
    PreprocessConfig,
    _finite,
    _freeze_lists,
    _require,
    _require_size,
    check_pixel_likelihood,
    resolve_preprocess,
)
from vqtok.hub import HubModel
from vqtok.models.pixels import PixelModel

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class HierarchicalVAEConfig:
    """A hierarchical VAE (`kind: hierarchical_vae` in a training config's `model` section).

    `scales` are the downsampling factors of the latent scales, coarsest (top) first, distinct powers of two (e.g.
    [4, 2]: latents at 7x7 and 14x14 for 28x28 images); `groups_per_scale` the number of latent groups at each, at
    least one at the coarsest (0 leaves a finer scale without latents: [1, 0] is a single-level VAE of the same
    architecture), each of `latent_channels` channels. Every block has `width` channels (the cells' middle `bottleneck_ratio` x width).
    `encoder_cells` residual cells run at each resolution of the bottom-up path, `cells_per_group` after each group
    and at each latent-free resolution of the top-down path.

    The regulariser: `beta` x the KL summed over groups; `free_bits` (nats per group, on the optimizer step's whole
    batch; 0 = off); `kl_balance` NVAE's balancing of the groups while the training's KL weight is below 1;
    `spectral_reg` the weight of NVAE's spectral regularisation (0 = off).
    """

    kind: Literal["hierarchical_vae"] = "hierarchical_vae"
    in_channels: int = 1
    resolution: int = 28
    scales: tuple[int, ...] = (4, 2)
    groups_per_scale: tuple[int, ...] = (2, 2)
    latent_channels: int = 8
    width: int = 64
    bottleneck_ratio: float = 0.25
    encoder_cells: int = 2
    cells_per_group: int = 1
    input_range: Literal["-1,1", "0,1"] = "0,1"
    decoder_output: Literal["image", "bernoulli_logits", "logistic_mixture"] = "bernoulli_logits"
    num_mixtures: int | None = None
    beta: float = 1.0
    free_bits: float = 0.0
    kl_balance: bool = False
    spectral_reg: float = 0.0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        _freeze_lists(self)
        _require(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        _require(len(self.scales) >= 1, "scales must name at least one latent scale")
        _require(all(s >= 1 and s & (s - 1) == 0 for s in self.scales),
                 f"scales must be powers of two (downsampling factors), got {list(self.scales)}")
        _require(all(a > b for a, b in zip(self.scales, self.scales[1:])),
                 f"scales must be distinct and listed coarsest first (decreasing), got {list(self.scales)}")
        _require(self.resolution >= 1 and self.resolution % self.scales[0] == 0,
                 f"resolution ({self.resolution}) must be a positive multiple of the coarsest scale's factor "
                 f"{self.scales[0]}")
        resolve_preprocess(self)  # resize and crop left out: the resolution, the only size this model takes
        _require(len(self.groups_per_scale) == len(self.scales),
                 f"groups_per_scale needs one entry per scale ({len(self.scales)}), got {list(self.groups_per_scale)}")
        _require(all(g >= 0 for g in self.groups_per_scale) and self.groups_per_scale[0] >= 1,
                 "groups_per_scale must be >= 0, with at least one group at the coarsest scale (the top group; a "
                 f"coarser scale without latents would only add weights without gradients), got "
                 f"{list(self.groups_per_scale)}")
        for name in ("latent_channels", "width", "cells_per_group"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(self.encoder_cells >= 0, f"encoder_cells must be >= 0, got {self.encoder_cells}")
        _require(0 < self.bottleneck_ratio <= 1, f"bottleneck_ratio must be in (0, 1], got {self.bottleneck_ratio}")
        check_pixel_likelihood(self)
        _require(self.beta >= 0 and _finite(self.beta), f"beta must be finite and >= 0, got {self.beta}")
        _require(self.free_bits >= 0 and _finite(self.free_bits), f"free_bits must be finite and >= 0, got {self.free_bits}")
        _require(self.spectral_reg >= 0 and _finite(self.spectral_reg),
                 f"spectral_reg must be finite and >= 0 (0 = off), got {self.spectral_reg}")
        _require_size(self.num_elements, f"width {self.width} with {self.num_groups} groups of {self.latent_channels} "
                      f"channels at scales {list(self.scales)} give a model")

    @property
    def num_groups(self) -> int:
        return sum(self.groups_per_scale)

    @property
    def cell_width(self) -> int:
        return max(1, round(self.width * self.bottleneck_ratio))

    @property
    def value_range(self) -> tuple[float, float]:
        return (-1.0, 1.0) if self.input_range == "-1,1" else (0.0, 1.0)

    @property
    def group_factors(self) -> tuple[int, ...]:
        """The downsampling factor of every latent group, top first."""
        return tuple(f for f, g in zip(self.scales, self.groups_per_scale) for _ in range(g))

    @property
    def latent_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """[C, h, w] of every latent group, top first."""
        return tuple((self.latent_channels, self.resolution // f, self.resolution // f) for f in self.group_factors)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The downsampling factors the paths visit: every power of two from the coarsest scale's down to 1."""
        return tuple(2**i for i in reversed(range(int(math.log2(self.scales[0])) + 1)))

    @property
    def num_elements(self) -> int:
        """Elements of every parameter and buffer of the model, counted on the meta device (nothing allocated)."""
        with torch.device("meta"):
            model = HierarchicalVAE(self)
        return sum(t.numel() for t in model.state_dict().values())


# ----------------------------------------------------------------------------------------------------------------
# Blocks


class Cell(nn.Module):
    """VDVAE's bottleneck block: GELU, 1x1 to `mid`, GELU, 3x3, GELU, 3x3, GELU, 1x1 to `out` (+ x if residual).

    `last_scale` multiplies the last convolution's initial weights (1/sqrt(cells) in a residual stack); `zero_last`
    initialises it to zero (the prior and posterior heads, so that q = p = N(0, I) at first)."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, *, residual: bool, last_scale: float = 1.0,
                 zero_last: bool = False):
        super().__init__()
        self.residual = residual
        self.c1 = nn.Conv2d(in_channels, mid, 1)
        self.c2 = nn.Conv2d(mid, mid, 3, padding=1)
        self.c3 = nn.Conv2d(mid, mid, 3, padding=1)
        self.c4 = nn.Conv2d(mid, out_channels, 1)
        with torch.no_grad():
            if zero_last:
                self.c4.weight.zero_()
                self.c4.bias.zero_()
            elif last_scale != 1.0:
                self.c4.weight.mul_(last_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        return x + h if self.residual else h


class LatentGroup(nn.Module):
    """One group of the top-down path: its prior (unless it is the top group), its residual posterior, the
    projection of its sample into h, and the cells that follow."""

    def __init__(self, config: HierarchicalVAEConfig, *, top: bool, cell_scale: float):
        super().__init__()
        w, mid, zc = config.width, config.cell_width, config.latent_channels
        self.top, self.latent_channels = top, zc
        self.prior = None if top else Cell(w, mid, 2 * zc + w, residual=False, zero_last=True)
        self.posterior = Cell(2 * w, mid, 2 * zc, residual=False, zero_last=True)
        self.z_proj = nn.Conv2d(zc, w, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(cell_scale)
        self.cells = nn.Sequential(*[Cell(w, mid, w, residual=True, last_scale=cell_scale)
                                     for _ in range(config.cells_per_group)])

    def prior_of(self, h: torch.Tensor) -> tuple[DiagonalGaussian, torch.Tensor | None]:
        """p(z_l | z_<l) from the top-down features h (its parameters in float32 at least, also under bf16
        autocast), and the features the prior adds to h (None for the top)."""
        dtype = torch.promote_types(h.dtype, torch.float32)
        if self.prior is None:
            zeros = torch.zeros((h.shape[0], self.latent_channels, *h.shape[2:]), dtype=dtype, device=h.device)
            return DiagonalGaussian(zeros, zeros), None
        mean, logvar, features = self.prior(h).split([self.latent_channels, self.latent_channels, h.shape[1]], 1)
        return DiagonalGaussian(mean.to(dtype), logvar.to(dtype)), features

    def posterior_of(self, h: torch.Tensor, act: torch.Tensor, prior: DiagonalGaussian) -> DiagonalGaussian:
        """q(z_l | x, z_<l), residual with respect to the prior: (mu_p + dmu, logvar_p + dlogvar)."""
        d_mean, d_logvar = self.posterior(torch.cat([h, act], dim=1)).chunk(2, dim=1)
        dtype = torch.promote_types(d_mean.dtype, torch.float32)  # a small residual survives bf16 autocast
        return DiagonalGaussian(prior.mean.to(dtype) + d_mean.to(dtype), prior.logvar.to(dtype) + d_logvar.to(dtype))

    def absorb(self, h: torch.Tensor, features: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        """h after the group: plus the prior's features and the projected sample, through the cells."""
        if features is not None:
            h = h + features
        return self.cells(h + self.z_proj(z.to(h.dtype)))


@dataclass
class GroupPass:
    """One group's part of a top-down pass: its prior, its posterior (None when sampling from the prior), its z."""

    prior: DiagonalGaussian
    posterior: DiagonalGaussian | None
    z: torch.Tensor

    def kl(self) -> torch.Tensor:
        """KL(q || p) per image [B] in nats (analytic, given the z of the groups above)."""
        return self.posterior.kl(self.prior).flatten(1).sum(dim=1)

    def log_ratio(self) -> torch.Tensor:
        """log p(z) - log q(z) per image [B] at this pass's z."""
        return (self.prior.log_prob(self.z) - self.posterior.log_prob(self.z)).flatten(1).sum(dim=1)


@dataclass
class HierarchicalVAEOutput:
    """reconstruction: the decoder's output (likelihood parameters or an image; `to_image` makes an image);
    bottleneck: the KL regulariser (with the KL per image and group in `kl_units`), the posteriors (top first) and
    statistics; groups: each group's pass."""

    reconstruction: torch.Tensor
    bottleneck: BottleneckOutput
    groups: list[GroupPass]

    @property
    def loss(self) -> torch.Tensor:
        return self.bottleneck.loss


# ----------------------------------------------------------------------------------------------------------------
# The model


class HierarchicalVAE(PixelModel, HubModel, model_type="hierarchical_vae"):
    """A hierarchical VAE tokenizer, saved and loaded in the Hub format (see the module docstring)."""

    config_class = HierarchicalVAEConfig
    derived_keys = ("latent_shapes", "value_range")

    def __init__(self, config: HierarchicalVAEConfig):
        super().__init__()
        self.config = c = config
        w, mid = c.width, c.cell_width
        resolutions = c.resolutions[::-1]  # bottom-up: 1, 2, 4, ...
        encoder_scale = 1 / math.sqrt(max(1, c.encoder_cells * len(resolutions)))
        self.stem = nn.Conv2d(c.in_channels, w, 3, padding=1)
        self.encoder = nn.ModuleList(
            nn.Sequential(*[Cell(w, mid, w, residual=True, last_scale=encoder_scale) for _ in range(c.encoder_cells)])
            for _ in resolutions)
        top_factor = c.scales[0]
        self.top_bias = nn.Parameter(torch.zeros(1, w, c.resolution // top_factor, c.resolution // top_factor))
        plain = [f for f, n in zip(c.resolutions, _groups_at(c)) if n == 0]  # latent-free resolutions (top-down)
        decoder_cells = c.cells_per_group * (c.num_groups + len(plain))
        decoder_scale = 1 / math.sqrt(decoder_cells)
        self.groups = nn.ModuleList(LatentGroup(c, top=i == 0, cell_scale=decoder_scale) for i in range(c.num_groups))
        self.refine = nn.ModuleDict({
            str(f): nn.Sequential(*[Cell(w, mid, w, residual=True, last_scale=decoder_scale)
                                    for _ in range(c.cells_per_group)]) for f in plain})
        self.head = nn.Conv2d(w, self.output_channels(), 3, padding=1)
        per_scale = dict(zip(c.scales, c.groups_per_scale))  # NVAE's alpha: a group's size over its scale's groups
        alpha = tuple(math.prod(s) / per_scale[f] for s, f in zip(c.latent_shapes, c.group_factors))
        self.kl_objective = KLObjective(beta=c.beta, free_bits=c.free_bits, balance=c.kl_balance, balance_alpha=alpha)

    # ------------------------------------------------------------------------------------------------------------
    # The two paths

    def bottom_up(self, x: torch.Tensor, *, check: bool = True) -> dict[int, torch.Tensor]:
        """The encoder's features at every latent scale {factor: [B, width, H/f, W/f]} (`check`: see `forward`)."""
        self.check_images(x, values=check)
        low, high = self.config.value_range
        h = self.stem(((x - low) / (high - low) * 2 - 1).to(self.stem.weight.dtype))  # inputs centred on [-1, 1]
        acts = {}
        for i, cells in enumerate(self.encoder):
            factor = 2**i
            h = cells(h)
            if factor in self.config.scales:
                acts[factor] = h
            if factor < self.config.scales[0]:
                h = F.avg_pool2d(h, 2)
        return acts

    def top_down(self, batch: int, *, acts: dict[int, torch.Tensor] | None = None, sample: bool = True,
                 latents: list[torch.Tensor] | None = None, temperature: float = 1.0,
                 generator: Noise = None) -> tuple[torch.Tensor, list[GroupPass]]:
        """The shared top-down path; returns the decoder's output and each group's pass.

        With `acts` (inference) each z_l comes from the posterior: a sample (`sample`) or its mean; with `latents`
        it is given; otherwise it is drawn from the prior with its standard deviation scaled by `temperature`."""
        c = self.config
        h = self.top_bias.expand(batch, -1, -1, -1)
        passes: list[GroupPass] = []
        groups = iter(self.groups)
        for factor, count in zip(c.resolutions, _groups_at(c)):
            if factor != c.resolutions[0]:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            if count == 0:
                h = self.refine[str(factor)](h)
                continue
            for _ in range(count):
                group = next(groups)
                prior, features = group.prior_of(h)
                posterior = None
                if latents is not None:
                    z = latents[len(passes)]
                elif acts is not None:
                    posterior = group.posterior_of(h, acts[factor], prior)
                    z = posterior.sample(generator) if sample else posterior.mode()
                else:
                    z = prior.sample(generator, temperature)
                passes.append(GroupPass(prior, posterior, z))
                h = group.absorb(h, features, z)
        return self.head(F.gelu(h)), passes

    # ------------------------------------------------------------------------------------------------------------
    # The API

    def forward(self, x: torch.Tensor, generator: Noise = None, *, check: bool = True) -> HierarchicalVAEOutput:
        """Reconstruct x: posterior samples in training (drawn with `generator`, see DiagonalGaussian.sample),
        posterior means in evaluation; the KL of every group. `check=False` skips the finite-pixels check, which
        waits for the device (the training loop's images come from uint8)."""
        output, passes = self.top_down(x.shape[0], acts=self.bottom_up(x, check=check), sample=self.training,
                                       generator=generator)
        kl_units = torch.stack([p.kl() for p in passes], dim=1)  # [B, groups]
        terms = {"kl": kl_units.sum(dim=1).mean()}
        terms.update({f"kl/group_{i}": v for i, v in enumerate(kl_units.detach().mean(dim=0))})
        stats = {"posterior_std": torch.stack([p.posterior.std.detach().float().mean() for p in passes]).mean()}
        bottleneck = BottleneckOutput(z=passes[0].z, loss=self.kl_objective.loss(kl_units), terms=terms, stats=stats,
                                      posterior=[p.posterior for p in passes], kl_units=kl_units)
        return HierarchicalVAEOutput(reconstruction=output, bottleneck=bottleneck, groups=passes)

    def encode(self, x: torch.Tensor) -> list[DiagonalGaussian]:
        """Images in the model range -> the posterior of every group, top first (`.sample()`, `.mode()`), each
        conditioned on the means of the groups above (deterministic: what a token store keeps)."""
        _, passes = self.top_down(x.shape[0], acts=self.bottom_up(x), sample=False)
        return [p.posterior for p in passes]

    def decode(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """The latents of every group (top first, [B, C, h, w] each, as `latent_shapes`) -> images in the model
        range."""
        self.check_latents(latents)
        output, _ = self.top_down(latents[0].shape[0], latents=[z.to(self._device()) for z in latents])
        return self.to_image(output)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> their reconstructions (every group at its posterior mean), in the model range."""
        return self.decode([q.mode() for q in self.encode(x)])

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, seed: int | None = None) -> torch.Tensor:
        """n images (model range) from the prior; `temperature` scales every group's prior standard deviation (NVAE).
        Bernoulli models give each pixel's probability, logistic mixtures each pixel's most probable value."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None  # CPU: the same on any device
        output, _ = self.top_down(n, temperature=temperature, generator=generator)
        return self.to_image(output)

    def code_length(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
                    output: HierarchicalVAEOutput | None = None) -> dict[str, torch.Tensor]:
        """The negative ELBO's terms in nats per image [B] (beta 1, no free bits), at one sample of every group:
        'nll' = -log p(x | z) and 'kl' = the sum over groups of KL(q(z_l | x, z_<l) || p(z_l | z_<l)), analytic
        given the samples above, and 'kl_groups' [B, groups]. (`output` is accepted for the autoencoder's signature; a
        fresh sample is drawn.)"""
        self.discrete_likelihood()
        params, passes = self.top_down(x.shape[0], acts=self.bottom_up(x), sample=True, generator=generator)
        kl_groups = torch.stack([p.kl() for p in passes], dim=1)
        return {"kl": kl_groups.sum(dim=1), "kl_groups": kl_groups, "nll": self.pixel_nll(params, x)}

    def log_weights(self, x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance log-weights log p(x, z_i) - log q(z_i | x) [B, num_samples], z_i ~ q(z | x) through every
        group (the IWAE bound's terms), in float32 (float64 stays float64)."""
        self.discrete_likelihood()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        acts = {f: a.repeat_interleave(num_samples, dim=0) for f, a in self.bottom_up(x).items()}
        params, passes = self.top_down(x.shape[0] * num_samples, acts=acts, sample=True, generator=generator)
        log_px = -self.pixel_nll(params, x.repeat_interleave(num_samples, dim=0))
        return (log_px + torch.stack([p.log_ratio() for p in passes]).sum(dim=0)).view(x.shape[0], num_samples)

    def regularisation(self, out: HierarchicalVAEOutput, *, kl_weight: float = 1.0,
                       step_kl_mean: torch.Tensor | None = None) -> torch.Tensor:
        """kl_weight x the KL objective over the optimizer step's batch (`step_kl_mean`: its average KL per group,
        None: this batch's), plus the spectral regularisation when configured."""
        loss = self.kl_objective.loss(out.bottleneck.kl_units, step_kl_mean, kl_weight=kl_weight)
        if self.config.spectral_reg > 0:
            loss = loss + self.config.spectral_reg * self.spectral_norm_sum()
        return loss

    def spectral_norm_sum(self) -> torch.Tensor:
        """The sum over every convolution of its weight's largest singular value (as a [out, in * k * k] matrix),
        NVAE's spectral regulariser, computed exactly (differentiable)."""
        weights = [m.weight for m in self.modules() if isinstance(m, nn.Conv2d)]
        return sum(torch.linalg.matrix_norm(w.float().flatten(1), ord=2) for w in weights)

    def on_optimizer_step(self, skipped: bool | torch.Tensor = False) -> dict[str, torch.Tensor]:
        return {}

    # ------------------------------------------------------------------------------------------------------------
    # Checks and facts

    @property
    def is_gaussian(self) -> bool:
        return True

    @property
    def vocab_size(self) -> None:
        return None

    @property
    def latent_shapes(self) -> tuple[tuple[int, int, int], ...]:
        return self.config.latent_shapes

    def check_images(self, x: torch.Tensor, *, values: bool = True) -> None:
        self.check_input(x, values=values)
        size = self.config.resolution
        if tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"a hierarchical VAE takes images of its resolution {size}x{size}, got "
                             f"{x.shape[-2]}x{x.shape[-1]}; resize or crop them (preprocess does)")

    def check_latents(self, latents: list[torch.Tensor]) -> None:
        shapes = self.config.latent_shapes
        if not isinstance(latents, (list, tuple)) or len(latents) != len(shapes):
            raise ValueError(f"decode takes a list of {len(shapes)} latent tensors (one per group, top first), got "
                             f"{type(latents).__name__}")
        for i, (z, shape) in enumerate(zip(latents, shapes)):
            if not torch.is_tensor(z) or not z.is_floating_point() or z.ndim != 4 or tuple(z.shape[1:]) != shape:
                raise ValueError(f"latents of group {i} must be float [B, {', '.join(map(str, shape))}], got "
                                 f"{getattr(z, 'dtype', type(z).__name__)} {list(getattr(z, 'shape', []))}")
            if z.shape[0] != latents[0].shape[0]:
                raise ValueError(f"every group's latents need the same batch size, group {i} has {z.shape[0]}")
            if not torch.isfinite(z).all():
                raise ValueError(f"latents of group {i} contain NaN or infinite values")

    card_task = ("unconditional-image-generation", "Image modelling")

    def card_defaults(self, load: str) -> dict[str, Any]:
        """The hierarchical VAE's model card (see HubModel.generate_model_card)."""
        c = self.config
        shapes = ", ".join("x".join(str(n) for n in shape) for shape in c.latent_shapes)
        return {
            "description": "hierarchical VAE",
            "intro": f"A hierarchical VAE made with [vqtok](https://github.com/vqtok/vqtok): {c.resolution}x"
                     f"{c.resolution} images, {c.num_groups} groups of latents (top first: {shapes}).",
            "tags": ["image-tokenizer", "vae", "hierarchical-vae"],
            "pipeline_tag": "unconditional-image-generation",
            "usage": (f"import vqtok\n\nvae = {load}\nx = vae.preprocess(images)  # PIL images or uint8 arrays -> "
                      "[B, C, H, W] in the model's range\nlatents = [q.mode() for q in vae.encode(x)]  # every "
                      "group's posterior mean, top first\nreconstructions = vae.postprocess(vae.decode(latents), "
                      "output_type=\"pil\")\nsamples = vae.postprocess(vae.sample(16, seed=0), output_type=\"pil\")"),
            "intended_use": "Density estimation (bits per dimension) and sampling of small images like its training "
                            "data, hierarchical latents for models built on them, and research on VAEs.",
            "limitations": "Trained on the small images named in its training configuration, at the resolution "
                           "above; on other images its likelihood and samples are unmeasured. Its likelihoods are "
                           "bounds (the negative ELBO, the IWAE bound) on the data they name; the samples of a small "
                           "VAE are blurry next to its reconstructions. It inherits the biases and gaps of its "
                           "training data and has not been evaluated for any use involving people.",
        }

    def derived_config(self) -> dict[str, Any]:
        return {"latent_shapes": [list(s) for s in self.config.latent_shapes],
                "value_range": list(self.config.value_range)}


def _groups_at(config: HierarchicalVAEConfig) -> list[int]:
    """The number of latent groups at each resolution of the top-down path (config.resolutions)."""
    per_scale = dict(zip(config.scales, config.groups_per_scale))
    return [per_scale.get(f, 0) for f in config.resolutions]
