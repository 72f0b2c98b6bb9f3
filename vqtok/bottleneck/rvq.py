"""Residual vector quantization (RVQ: Zeghidour et al. 2021, SoundStream; Lee et al. 2022, RQ-VAE).

A stack of `depth` VQ codebooks, each quantizing what the levels before it left: with r_0 = z (the features, in
float32),

    c_l = argmin_k ||r_l - e^l_k||^2,    q_l = e^l_{c_l},    r_{l+1} = r_l - q_l,     l = 0 .. R - 1,

and the decoder gets the sum z^ = q_0 + ... + q_{R-1} exactly, with one straight-through gradient for the whole sum
(RQ-VAE's: d z^ / d z = I whatever the depth, written z^ + (z - sg(z)), which adds an exact 0; a straight-through
estimator per level, as SoundStream and vector-quantize-pytorch sum them, would scale the encoder's gradient by R).
Each level is a `VectorQuantizer` with the VQ fields of the config: the same exact float32 search, EMA codebook,
k-means initialisation, dead-code restarts, usage statistics, the same sync-free, masked `on_optimizer_step`. A
level's k-means reservoir starts to fill only once every level above it is initialised, so that it clusters the
residuals of trained codebooks, not of random ones (level l is initialised about l x kmeans_samples /
vectors-per-step steps after the first).

Loss: sum over levels of beta x ||r_l - sg(q_l)||^2 (each level's commitment, mean over elements; plus each level's
codebook term without EMA). The encoder gets the commitment of every level through r_l = z - sg(q_0 + .. q_{l-1}).

Codes are [B, h, w, R] (level fastest), `vocab_size` = K per level. `decode` takes any prefix [B, h, w, r], 1 <= r
<= R, and gives q_0 + ... + q_{r-1}: the coarse-to-fine reconstructions RVQ is made for.

Quantizer dropout (SoundStream): with `quantizer_dropout` p > 0, in training each image, with probability p, gives
the decoder only a prefix of the levels, its length uniform in 1 .. R (so full depth with probability 1 - p + p/R),
so that the decoder learns to decode every prefix. The draw is a counter-based hash of (rng_seed, steps, micro-batch,
rank, image) on the device (nothing read on the host; the same on resume), `steps` counting every applied step
from the first (a level's own steps start after its k-means). Only the decoder's input changes: every level
still quantizes (its residual r_l does not depend on the dropout), keeps its statistics and its commitment term.

Statistics (each level's step hook reduces its own across processes: one all-reduce per level, depth per optimizer
step): each level's (usage over its window, dead codes, perplexity, ...) under `level_l/`, and overall `usage`
(the fraction of all R x K level codes used recently) and `perplexity` (the mean of the levels'), from the step hook;
forward's are the batch's `quant_error` (mean squared error of the full sum: what the decoder's input misses) and
each level's (its residual's error).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
from einops import rearrange

from vqtok import distributed as dist
from vqtok.bottleneck.base import Bottleneck, BottleneckOutput, applied_mask, check_codes
from vqtok.bottleneck.vq import VectorQuantizer, random_indices
from vqtok.config import VQConfig, _require, _require_size

DROPOUT_SALT = 0x52565144  # keys the quantizer-dropout draws apart from the levels' restart draws


@dataclass(frozen=True)
class RVQConfig(VQConfig):
    """Residual VQ: `depth` levels, each a VQ codebook with the VQ fields (codebook_size K, dim D, beta, ema, decay,
    kmeans_init, dead_threshold, ...; see VQConfig), quantizing the previous level's residual. Codes [B, h, w, depth]
    of K values each (depth x log2 K bits per position). `quantizer_dropout`: the probability that a training image
    gives the decoder a random prefix of the levels (SoundStream's quantizer dropout), 0 to train at full depth.
    `l2_normalize` (residuals are not unit vectors) and `rotation_trick` (RVQ has one straight-through gradient for
    the sum of its levels) are refused."""

    kind: Literal["rvq"] = "rvq"  # type: ignore[assignment]
    depth: int = 2
    quantizer_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(isinstance(self.depth, int) and not isinstance(self.depth, bool) and self.depth >= 1,
                 f"depth must be an integer >= 1, got {self.depth}")
        _require(0.0 <= self.quantizer_dropout <= 1.0,
                 f"quantizer_dropout must be in [0, 1], got {self.quantizer_dropout}")
        _require(self.quantizer_dropout == 0 or self.depth >= 2, f"quantizer_dropout {self.quantizer_dropout} needs "
                 "depth >= 2: one level has no shorter prefix to drop to")
        _require(not self.l2_normalize, "l2_normalize is not supported by rvq: the residuals a level quantizes are "
                                        "not unit vectors (use kind: vq for a codebook on the sphere)")
        _require(not self.rotation_trick, "rotation_trick is not supported by rvq: its levels share one "
                                          "straight-through gradient for their sum (use kind: vq for the trick)")
        _require_size(self.num_elements, f"depth {self.depth} of codebook_size {self.codebook_size} with dim "
                                         f"{self.dim} give codebooks")

    @property
    def num_elements(self) -> int:
        """Elements of every level's tensors, plus the dropout draws' seed and the step counter."""
        return self.depth * super().num_elements + 2

    @property
    def level_config(self) -> VQConfig:
        """The VQConfig of each level: this config's VQ fields."""
        return VQConfig(**{f.name: getattr(self, f.name) for f in fields(VQConfig) if f.name != "kind"})


class ResidualVectorQuantizer(Bottleneck):
    """RVQ behind the `Bottleneck` interface: codes [B, h, w, depth] of `vocab_size` = K values per level."""

    def __init__(self, config: RVQConfig):
        super().__init__()
        self.config = config
        self.dim = self.in_channels = config.dim
        self.vocab_size = config.codebook_size
        self.code_depth = config.depth
        self.levels = torch.nn.ModuleList(VectorQuantizer(config.level_config) for _ in range(config.depth))
        self.register_buffer("rng_seed", torch.randint(0, 1 << 62, ()))  # the dropout draws' (saved: exact resume)
        # optimizer steps applied after training forwards (a level's own `steps` start after its k-means): keys the
        # dropout draws with `rng_seed`, and says whether the quantizer was trained
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._micro_batches = 0  # forwards since the last optimizer step: keys the dropout draw of each micro-batch

    @property
    def initialized(self) -> torch.Tensor:
        """Whether every level's codebook is initialised (0-d bool)."""
        return torch.stack([level.initialized for level in self.levels]).all()

    # ------------------------------------------------------------------------------------------------------------
    # Forward, encode, decode

    def forward(self, h: torch.Tensor) -> BottleneckOutput:
        self.check_features(h)
        z = h.float()
        residual, total = z, torch.zeros_like(z)
        keep = self._dropout_masks(z) if self.training and self.config.quantizer_dropout > 0 else None
        loss, codes, terms, stats, perplexities = torch.zeros((), device=h.device), [], {}, {}, []
        ready = True  # every level above is initialised: this one may gather its k-means reservoir
        for l, level in enumerate(self.levels):
            out = level(residual, accumulate=ready)
            ready = ready and (not self.training or level._initialized())
            q = out.z.detach()
            total = total + (q if keep is None else q * keep[l])
            residual = residual - q
            loss = loss + out.loss
            codes.append(out.codes)
            terms.update({f"level_{l}/{k}": v for k, v in out.terms.items()})
            stats[f"level_{l}/quant_error"] = out.stats["quant_error"]
            perplexities.append(out.stats["perplexity"])
        if self.training:
            self._micro_batches += 1
        terms["commitment"] = sum(terms[f"level_{l}/commitment"] for l in range(len(self.levels)))
        # this batch's: the training loop takes the step's perplexities from on_optimizer_step instead
        stats["perplexity"] = torch.stack(perplexities).mean()
        stats["quant_error"] = (z.detach() - total).square().mean()  # what the decoder's input misses
        out = total + (z - z.detach())  # exactly the codes' sum (x - x = 0), d out / d z = I: one straight-through
        return BottleneckOutput(z=out.to(h.dtype), loss=loss, terms=terms, stats=stats,
                                codes=torch.stack(codes, dim=-1))

    def _dropout_masks(self, z: torch.Tensor) -> torch.Tensor:
        """[depth, B, 1, 1, 1] float masks: level l reaches image b's decoder input when l < its prefix length,
        drawn on the device (module docstring)."""
        b = z.shape[0]
        stream = self._micro_batches * dist.world_size() + dist.rank()  # each rank's images draw apart
        images = torch.arange(b, device=z.device) + stream * (1 << 32)
        coin = random_indices(self.rng_seed, self.steps, DROPOUT_SALT, images, 1 << 20).float() / (1 << 20)
        prefix = random_indices(self.rng_seed, self.steps, DROPOUT_SALT + 1, images, self.config.depth) + 1
        depth = torch.where(coin < self.config.quantizer_dropout, prefix, self.config.depth)
        levels = torch.arange(self.config.depth, device=z.device)[:, None]
        return (levels < depth[None]).float().view(self.config.depth, b, 1, 1, 1)

    @torch.no_grad()
    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Features [B, dim, h, w] -> codes LongTensor [B, h, w, depth]."""
        self.check_features(h)
        residual, codes = h.float(), []
        for level in self.levels:
            c = level.encode(residual)
            residual = residual - rearrange(level.code_vectors()[c], "b h w d -> b d h w")  # (codes valid: no check)
            codes.append(c)
        return torch.stack(codes, dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w, r], any prefix depth 1 <= r <= depth -> the sum of those levels' code vectors
        [B, dim, h, w] (float32)."""
        codes = check_codes(codes, self.vocab_size, depth=self.config.depth)
        vectors = sum(self.levels[l].code_vectors()[codes[..., l]] for l in range(codes.shape[-1]))
        return rearrange(vectors, "b h w d -> b d h w")

    # ------------------------------------------------------------------------------------------------------------
    # Once per optimizer step, and the statistics

    def on_optimizer_step(self, skipped: bool | torch.Tensor = False) -> dict[str, torch.Tensor]:
        """Every level's step, in level order on every rank (each all-reduces what it gathered: one collective per
        level, depth per step; while a level waits for its k-means it also reads its readiness on the host, as a
        VQ's initialisation does), then `steps`, masked by a tensor `skipped` as the levels' buffers are. Returns
        the levels' statistics under `level_l/`, with the overall usage and mean perplexity."""
        trained, self._micro_batches = self._micro_batches > 0, 0
        keep = applied_mask(skipped)
        if trained and keep is not None:
            self.steps += keep.long()
        elif trained and not skipped:
            self.steps += 1
        stats: dict[str, torch.Tensor] = {}
        for l, level in enumerate(self.levels):
            stats.update({f"level_{l}/{k}": v for k, v in level.on_optimizer_step(skipped).items()})
        if not stats:
            return {}
        perplexities = [stats.get(f"level_{l}/perplexity") for l in range(len(self.levels))]
        if all(p is not None for p in perplexities):
            stats["perplexity"] = torch.stack(perplexities).mean()
        usage = [stats[f"level_{l}/usage"] if f"level_{l}/usage" in stats else level.codebook_stats()["usage"]
                 for l, level in enumerate(self.levels)]
        return {**stats, "usage": torch.stack(usage).mean()}

    @torch.no_grad()
    def codebook_stats(self) -> dict[str, torch.Tensor]:
        """Every level's `codebook_stats` under `level_l/`, and `usage`: the fraction of all depth x K codes used
        over the levels' windows (the mean of the levels' usage)."""
        stats = {}
        for l, level in enumerate(self.levels):
            stats.update({f"level_{l}/{k}": v for k, v in level.codebook_stats().items()})
        stats["usage"] = torch.stack([stats[f"level_{l}/usage"] for l in range(len(self.levels))]).mean()
        return stats

    def transient_state(self) -> dict[str, torch.Tensor]:
        """The levels' k-means reservoirs while they fill (see VectorQuantizer.transient_state)."""
        return {f"level_{l}.{k}": v for l, level in enumerate(self.levels) for k, v in level.transient_state().items()}

    def load_transient_state(self, state: dict[str, torch.Tensor]) -> None:
        for l, level in enumerate(self.levels):
            prefix = f"level_{l}."
            level.load_transient_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


__all__ = ["RVQConfig", "ResidualVectorQuantizer"]
