"""Finite scalar quantization (FSQ; Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the d = len(levels) channels is bounded and rounded to one of L_i integers, independently: the implicit
codebook is the grid of prod(L_i) points, with no parameters and no auxiliary loss. The bound is the paper's (its
appendix A.1, and vector-quantize-pytorch's `FSQ.bound`): with half_l = (L - 1)(1 + eps) / 2, eps = 1e-3, an offset
o = 1/2 for even L (0 for odd) and a shift s = atanh(o / half_l),

    b(z) = tanh(z + s) * half_l - o      in (-(L - 1)(1 + eps)/2 - o, (L - 1)(1 + eps)/2 - o),

so that round(b) takes exactly L values: -(L - 1)/2 .. (L - 1)/2 for odd L, -L/2 .. L/2 - 1 for even L (the
offset shifts an even grid by half a level; b(0) = 0 either way). The decoder gets round(b) / (L // 2), in [-1, 1].
With L = 2 the offset puts the rounding threshold (b = -1/2) at z = -atanh(0.999) - s, far from 0: such a channel is
lopsided (the peer refuses L = 2 for this reason); prefer L >= 3.

Gradient: the rounding is straight-through, d round_ste(b) / d b = 1 everywhere (an autograd function whose output
is torch.round(b) itself), so d out / d z = tanh'(z + s) * half_l / (L // 2): the bound's smooth
derivative. There is no hard bound: the gradient decays with |z| (below 1e-3 of its peak past |z + s| ~ 4.5) and
underflows to 0 in float32 past |z + s| ~ 9 (tanh saturates); it is never clipped.

Precision: the bound and the rounding run in float32 with autocast off, whatever dtype the features arrive in, so
bfloat16 features (a conv under bf16 autocast) round as their float32 values do (vector-quantize-pytorch #114: its
rounding in bf16 lost levels). The output is cast back to the features' dtype; exact for the grid values.

Codes: the index of a code is its mixed-radix number, channel 0 fastest: idx = sum_i k_i * prod_{j<i} L_j with k_i
in [0, L_i) the channel's level (the peer's basis, so indices agree with vector-quantize-pytorch's).

Statistics (as the VQ's): forward counts codes into a plain attribute; `on_optimizer_step` all-reduces the counts
once per step (every rank joins), advances `steps` and the per-code `last_used` (the only buffers: usage over the
last `usage_window` steps, saved and loaded strictly) and reports the step's perplexity. Sync-free: counts by
scatter_add, a skipped step given as a 0-d bool device tensor is applied masked (`torch.where`), never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange

from vqtok.bottleneck.base import Bottleneck, BottleneckOutput, ImplicitCodebookUsage, check_codes
from vqtok.bottleneck.search import code_counts
from vqtok.config import _require, _require_size
from vqtok.metrics import perplexity

BOUND_EPS = 1e-3  # the paper's (and the peer's) margin: round(b) never reaches a level beyond the L allowed
MAX_VOCAB = 1 << 31  # as VQConfig.codebook_size: int32 codes in a token store


@dataclass(frozen=True)
class FSQConfig:
    """Finite scalar quantization: `levels` L_i >= 2 per channel give prod(L_i) codes (e.g. [8, 5, 5, 5] = 1,000,
    [8, 8, 8, 5, 5, 5] = 64,000). The bottleneck's width `dim` is len(levels), not a key: the autoencoder's 1x1
    quant_conv / post_quant_conv project the encoder's `latent_channels` to it and back (the peer's `dim` argument).
    `usage_window`: the steps over which training usage is counted, as the VQ's. No loss, no codebook parameters."""

    kind: Literal["fsq"] = "fsq"
    levels: tuple[int, ...] = (8, 5, 5, 5)
    usage_window: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.levels, list):
            object.__setattr__(self, "levels", tuple(self.levels))
        _require(len(self.levels) >= 1, "levels must name at least one channel's number of levels, e.g. [8, 5, 5, 5]")
        _require(all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in self.levels),
                 f"levels must be integers >= 2, got {list(self.levels)}")
        _require(self.vocab_size <= MAX_VOCAB,
                 f"levels {list(self.levels)} give {self.vocab_size:,} codes, more than {MAX_VOCAB:,}")
        _require(self.usage_window >= 1, f"usage_window must be >= 1, got {self.usage_window}")
        _require_size(self.num_elements, f"levels {list(self.levels)} give usage statistics")

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def vocab_size(self) -> int:
        return math.prod(self.levels)

    @property
    def num_elements(self) -> int:
        """Elements of the quantizer's buffers: last use per code, the step counter."""
        return self.vocab_size + 1


class _RoundStraightThrough(torch.autograd.Function):
    """round(b) forward (half to even, as torch.round), the identity backward: the output is exactly the integer."""

    @staticmethod
    def forward(ctx, b: torch.Tensor) -> torch.Tensor:
        return torch.round(b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(b: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer (ties to even) with the straight-through gradient d out / d b = 1."""
    return _RoundStraightThrough.apply(b)


class FiniteScalarQuantizer(ImplicitCodebookUsage, Bottleneck):
    """FSQ behind the `Bottleneck` interface: codes [B, h, w] in [0, prod(levels)), no parameters, loss 0."""

    def __init__(self, config: FSQConfig):
        super().__init__()
        self.config = config
        self.dim = self.in_channels = config.dim
        self.vocab_size = config.vocab_size
        levels = torch.tensor(config.levels, dtype=torch.float64)
        half_l = (levels - 1) * (1 + BOUND_EPS) / 2
        offset = (levels % 2 == 0).double() * 0.5
        # constants (not saved: they follow from the config), computed in float64 and kept in float32
        for name, value in {"_half_l": half_l, "_offset": offset, "_shift": torch.atanh(offset / half_l),
                            "_half_width": torch.floor(levels / 2)}.items():
            self.register_buffer(name, value.float().view(1, -1, 1, 1), persistent=False)
        basis = torch.cumprod(torch.tensor((1, *config.levels[:-1]), dtype=torch.long), 0)
        self.register_buffer("_levels", torch.tensor(config.levels, dtype=torch.long), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self._register_usage(self.vocab_size)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Keep the bound's constants float32 under .half() / .to(bfloat16)."""
        super()._apply(fn, recurse)
        for name in ("_half_l", "_offset", "_shift", "_half_width"):
            if self._buffers[name].dtype != torch.float32:
                self._buffers[name] = self._buffers[name].float()
        return self

    # ------------------------------------------------------------------------------------------------------------
    # The quantizer

    def bound(self, h: torch.Tensor) -> torch.Tensor:
        """Features [B, d, h, w] -> b(h) in float32 (module docstring), autocast off."""
        with torch.autocast(h.device.type, enabled=False):
            return torch.tanh(h.float() + self._shift) * self._half_l - self._offset

    def _quantize(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder input in float32, integer levels round(b) as float32), with the straight-through gradient."""
        with torch.autocast(h.device.type, enabled=False):
            rounded = round_ste(self.bound(h))
            return rounded / self._half_width, rounded

    def _indices(self, rounded: torch.Tensor) -> torch.Tensor:
        """Integer levels [B, d, h, w] -> code indices LongTensor [B, h, w] (mixed radix, channel 0 fastest)."""
        level = rounded.detach().long() + self._half_width.long()  # k_i in [0, L_i)
        return (level * self._basis.view(1, -1, 1, 1)).sum(dim=1)

    def forward(self, h: torch.Tensor) -> BottleneckOutput:
        self.check_features(h)
        out, rounded = self._quantize(h)
        codes = self._indices(rounded)
        counts = code_counts(codes, self.vocab_size)
        if self.training:
            self._accumulate(counts)
        loss = torch.zeros((), device=h.device)
        return BottleneckOutput(z=out.to(h.dtype), loss=loss, stats={"perplexity": perplexity(counts)}, codes=codes)

    @torch.no_grad()
    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Features [B, dim, h, w] -> codes LongTensor [B, h, w]."""
        self.check_features(h)
        return self._indices(self._quantize(h)[1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> decoder input [B, dim, h, w] (float32)."""
        codes = check_codes(codes, self.vocab_size)
        return rearrange(self.codes_to_vectors(codes), "b h w d -> b d h w")

    def code_levels(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [...] (int64) -> each channel's level k_i in [0, L_i), [..., d] (the inverse of the basis)."""
        return torch.div(codes.long()[..., None], self._basis, rounding_mode="floor") % self._levels

    def codes_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [...] -> the implicit codebook's vectors [..., d] in float32, what forward gives the decoder
        (channel-last; `decode` takes [B, h, w] and gives [B, d, h, w])."""
        half_width = self._half_width.view(-1)
        return (self.code_levels(codes).float() - half_width) / half_width

    def vectors_to_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Grid vectors [..., d] (as `codes_to_vectors` gives them) -> code indices [...]: the inverse bijection."""
        half_width = self._half_width.view(-1)
        level = torch.round(vectors.float() * half_width + half_width).long()
        return (level * self._basis).sum(dim=-1)

    # ------------------------------------------------------------------------------------------------------------
    # Statistics, once per optimizer step

    def on_optimizer_step(self, skipped: bool | torch.Tensor = False) -> dict[str, torch.Tensor]:
        """All-reduce the step's code counts (one call; every rank joins), then advance `steps` and `last_used`
        (`ImplicitCodebookUsage`; a skipped step's 0-d bool tensor is never read, its updates masked). Returns the
        step's perplexity (over all its micro-batches and ranks) and `codebook_stats`; {} when nothing is applied."""
        counts = self._reduce_step(skipped)
        if counts is None:
            return {}
        return {**self.codebook_stats(), "perplexity": perplexity(counts)}


__all__ = ["FSQConfig", "FiniteScalarQuantizer", "round_ste"]
