"""The one interface every bottleneck implements (Gaussian, vector-quantized, and the hierarchical stacks).

A bottleneck sits between the encoder's features and the decoder. Its `forward` returns the decoder input together
with the regulariser to add to the reconstruction objective and detached statistics; `encode`/`decode` map features
to the tokenizer's representation (codes or a posterior) and back. State that may change only once per optimizer
step (EMA codebooks, restarts, k-means initialisation) changes in `on_optimizer_step`, which the training loop calls
when gradients sync - never inside `forward`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vqtok import distributed as dist

NEVER = -(1 << 62)  # `last_used` of a code never assigned (discrete bottlenecks' usage statistics)


def applied_mask(skipped: bool | torch.Tensor) -> torch.Tensor | None:
    """A 0-d bool tensor `skipped` as the mask of a step that is applied (None: a plain, unmasked step)."""
    if isinstance(skipped, torch.Tensor):
        if skipped.numel() != 1 or skipped.dtype != torch.bool:
            raise ValueError(f"skipped must be a bool or a 0-d bool tensor, got {skipped.dtype} {tuple(skipped.shape)}")
        return ~skipped.reshape(())
    return None


@dataclass
class BottleneckOutput:
    """What a bottleneck's forward gives the model.

    z: decoder input [B, dim, h, w], differentiable with respect to the encoder features.
    loss: scalar regulariser, already weighted (beta * KL, or commitment + codebook terms), to add to the
        reconstruction objective.
    terms: the unweighted parts of `loss` for logging (e.g. 'kl' in nats per image, 'commitment', 'codebook').
    stats: detached diagnostics of this batch (e.g. perplexity, quantization error).
    codes: integer codes [B, h, w] for discrete bottlenecks ([B, h, w, code_depth] for a residual VQ), else None.
    posterior: the approximate posterior for Gaussian bottlenecks, else None.
    kl_units: for Gaussian bottlenecks, the KL per image and free-bits unit [B, U] in nats (differentiable), from
        which the training loop forms the regulariser over the optimizer step's whole batch (kl.KLObjective).
    """

    z: torch.Tensor
    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    codes: torch.Tensor | None = None
    posterior: Any = None
    kl_units: torch.Tensor | None = None


class Bottleneck(nn.Module, ABC):
    """Base class: `in_channels` are taken from the encoder side, `dim` channels are given to the decoder side."""

    in_channels: int
    dim: int
    vocab_size: int | None = None  # number of codes for discrete bottlenecks (per level for a residual VQ)
    code_depth: int | None = None  # codes [B, h, w, code_depth] (a residual VQ's levels); None: codes [B, h, w]

    @abstractmethod
    def forward(self, h: torch.Tensor) -> BottleneckOutput: ...

    @abstractmethod
    def encode(self, h: torch.Tensor) -> Any:
        """Features [B, in_channels, h, w] -> the tokenizer's representation (codes, or a posterior)."""

    @abstractmethod
    def decode(self, representation: torch.Tensor) -> torch.Tensor:
        """Codes or latents -> decoder input [B, dim, h, w]."""

    def on_optimizer_step(self, skipped: bool | torch.Tensor = False) -> dict[str, torch.Tensor]:
        """Apply state updates gathered since the last optimizer step (once per step, when gradients sync).

        `skipped=True` drops what was gathered (the training loop skipped the update, e.g. on a NaN gradient). The
        sync-free training step passes a 0-d bool tensor on the model's device, decided there: an implementation must
        not read it on the host, but apply its updates masked (`torch.where`). Returns statistics of the update for
        logging, as tensors that the loop reads at log steps only. Bottlenecks without such state do nothing.
        """
        return {}

    def check_features(self, h: torch.Tensor) -> None:
        if h.ndim != 4 or h.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects features [B, {self.in_channels}, h, w], got {tuple(h.shape)}"
            )


@torch.no_grad()
def record_step(steps: torch.Tensor, last_used: torch.Tensor, counts: torch.Tensor, keep: torch.Tensor | None) -> None:
    """Advance a discrete bottleneck's step counter and mark the codes this step counted as last used now; with
    `keep` (0-d bool, `applied_mask`) False, both buffers stay as they are (masked, nothing read on the host)."""
    applied = counts > 0
    if keep is None:
        steps += 1
    else:
        steps += keep.long()
        applied &= keep
    last_used.copy_(torch.where(applied, steps, last_used))


class ImplicitCodebookUsage:
    """Usage statistics of a bottleneck whose codebook is implicit (FSQ, LFQ: no parameters to update), mixed into its
    `Bottleneck` class: the only buffers are `steps` (optimizer steps applied) and `last_used` (the last step that used
    each code), saved and loaded strictly; forward adds its counts to a plain attribute (`_accumulate`), which
    `_reduce_step` all-reduces once per optimizer step (every rank joins), and `codebook_stats` gives the fraction of
    codes used over the last `config.usage_window` steps.

    Counts are a flat float tensor whose first `vocab_size` entries are the code counts; a bottleneck may append
    `extra` entries of its own (LFQ: each bit's ones) to be reduced in the same call. Sync-free: a skipped step given
    as a 0-d bool device tensor is applied masked (`torch.where`), never read on the host."""

    def _register_usage(self, vocab_size: int, extra: int = 0) -> None:
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.full((vocab_size,), NEVER, dtype=torch.long))
        self._pending: torch.Tensor | None = None  # the counts gathered since the last optimizer step
        self._has_pending = False
        self._pending_size = vocab_size + extra

    @torch.no_grad()
    def _accumulate(self, counts: torch.Tensor) -> None:
        if self._pending is None or self._pending.device != counts.device:
            self._pending = torch.zeros_like(counts)
        elif not self._has_pending:
            self._pending.zero_()
        self._pending += counts
        self._has_pending = True

    @torch.no_grad()
    def _reduce_step(self, skipped: bool | torch.Tensor) -> torch.Tensor | None:
        """The step's counts summed over its micro-batches and ranks, after advancing `steps` and `last_used`; None
        when there is nothing to apply (`skipped` True as a bool, or nothing gathered on one process). With `skipped`
        a 0-d bool tensor the step runs and its buffer updates are masked: a skipped step leaves both buffers as they
        were."""
        had_pending, self._has_pending = self._has_pending, False
        keep = applied_mask(skipped)
        if keep is None and skipped:
            return None
        if not had_pending and dist.world_size() == 1:
            return None
        if self._pending is None or self._pending.device != self.last_used.device:
            self._pending = torch.zeros(self._pending_size, device=self.last_used.device)
        elif not had_pending:
            self._pending.zero_()
        packed = dist.all_reduce_sum_(self._pending)
        record_step(self.steps, self.last_used, packed[: self.last_used.numel()], keep)
        return packed

    @torch.no_grad()
    def codebook_stats(self) -> dict[str, torch.Tensor]:
        """From the saved buffers: the fraction of the codes used over the last `usage_window` steps."""
        recent = self.last_used > self.steps - self.config.usage_window
        return {"usage": recent.float().mean()}


def check_codes(codes: torch.Tensor, vocab_size: int, depth: int | None = None) -> torch.Tensor:
    """A discrete bottleneck's codes [B, h, w] (with `depth`: [B, h, w, r], any prefix 1 <= r <= depth of a residual
    VQ's levels) checked (an integer tensor, values in [0, vocab_size)) and as int64 (uint16 codes, a token store's,
    have no min/max kernels); one-line errors naming the problem."""
    if not torch.is_tensor(codes) or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    codes = codes.long()
    if depth is None and codes.ndim != 3:
        raise ValueError(f"codes must have shape [B, h, w], got {tuple(codes.shape)}")
    if depth is not None and (codes.ndim != 4 or not 1 <= codes.shape[-1] <= depth):
        raise ValueError(f"codes must have shape [B, h, w, r] with 1 <= r <= {depth} (the levels to decode), got "
                         f"{tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab_size):
        raise ValueError(f"codes must lie in [0, {vocab_size}), got values in [{int(codes.min())}, {int(codes.max())}]")
    return codes
