"""The vector-quantized bottleneck (VQ-VAE, van den Oord et al. 2017), with an EMA codebook by default.

forward: each feature vector z goes to its nearest code e (exact float32 search, `search.py`); the decoder gets e
with the straight-through gradient (d out / d z = I). The loss is

    beta * ||z - sg(e)||^2                      (commitment, on the encoder)
    + codebook_weight * ||sg(z) - e||^2          (codebook, only when the codebook is trained by gradients)

as means over elements. Note where beta sits: on the encoder term (taming's `legacy=True` puts it on the other).

EMA codebook (Sonnet's VectorQuantizerEMA, debiased): with n_k vectors assigned to code k in one optimizer step and
s_k their sum (over micro-batches and ranks), hidden averages start at 0 and follow

    N_k <- g N_k + (1 - g) n_k,    m_k <- g m_k + (1 - g) s_k,    t <- t + 1,
    N^_k = N_k / (1 - g^t),        m^_k = m_k / (1 - g^t),
    e_k  = (m^_k + eps * e_k) / (N^_k + eps).

The Laplace pseudo-count eps sits at the code's current value rather than at the origin: a used code (N^ >> eps)
gets Sonnet's m^/N^ to within eps/N^, while an unused one keeps its value - it neither blows up (taming's N=0 start)
nor collapses to 0 (Sonnet's smoothing on zero sums). Dead codes - debiased count below `dead_threshold` times the
expected count per code - restart at a recent encoder output with N^_k = threshold and m^_k = threshold * e_k, so the
next EMA step does not undo them.

All of that state changes only in `on_optimizer_step`: forward merely accumulates n_k, s_k (and restart candidates
and the k-means reservoir) in plain attributes, not buffers, so DDP's buffer broadcast cannot overwrite them. Under
torch.distributed the step packs them into one all-reduce; dead-code candidates for code k come from rank k mod W,
so every rank draws the same restarts. Nothing communicates in eval mode or in forward.

Sync-free on a GPU: once the codebook is initialised, forward, backward and `on_optimizer_step` never make the host
wait for the device - no host reads of device values, no data-dependent shapes (counts by `scatter_add_`, not
`bincount`; masked updates by `torch.where`, not boolean indexing; the debiasing factor 1 - decay^t computed on the
device). Restart candidates are drawn by a counter-based hash of (rng_seed, steps, rank, code) on the device, so
the draw depends only on saved buffers: exact on resume, the same on CPU and CUDA. `on_optimizer_step(skipped)`
takes a Python bool or a 0-d bool tensor decided on the device; with a tensor, a skipped step is applied as a
masked no-op (every buffer keeps its value), never read on the host. The k-means initialisation (once per run) and
`codebook_stats` values read at log steps are the only places that may synchronise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vqtok import distributed as dist
from vqtok.bottleneck.base import NEVER, Bottleneck, BottleneckOutput, applied_mask, check_codes, record_step
from vqtok.bottleneck.kmeans import kmeans
from vqtok.bottleneck.search import code_counts, nearest_code
from vqtok.config import VQConfig
from vqtok.metrics import perplexity

_MASK62 = (1 << 62) - 1


def _as_int64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on signed integers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2^64 on CPU and CUDA alike): a
    counter-based random number generator, evaluated on the device without any state to read back."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def random_indices(seed: torch.Tensor, step: torch.Tensor, salt: int, keys: torch.Tensor, high: int) -> torch.Tensor:
    """Uniform integers in [0, high) (up to a bias below 2^-40 for high < 2^22), one per key, as a pure function of
    (seed, step, salt, key): int64 tensors in, computed where they live, nothing read on the host."""
    x = _mix64(seed + _GOLDEN * (step + 1))
    x = _mix64(x ^ _as_int64((salt * 0x9E3779B97F4A7C15 + 0x2545F491) % (1 << 64)))
    x = _mix64(x + keys * _GOLDEN)
    return (x & _MASK62) % high


def _assign(buffer: torch.Tensor, new: torch.Tensor, keep: torch.Tensor | None) -> None:
    """buffer <- new, or where `keep` (0-d bool) is False keep buffer as it is (also when new is not finite)."""
    buffer.copy_(new if keep is None else torch.where(keep, new, buffer))


# The rotation trick's degenerate cases (see _rotated_gradient): a norm at or below NORM_FLOOR counts as zero, and
# 1 + cos(z, e) at or below ANTIPODAL as z/||z|| = -e/||e||.
NORM_FLOOR = 1e-6
ANTIPODAL = 1e-4


class _QuantizeWithCommitment(torch.autograd.Function):
    """(h, e) -> (e, mean((h - e)^2)) with the straight-through gradient: d out / d h = I, nothing to e; with
    `rotation_trick`, d out / d h = sg(lambda R) instead (see `_rotated_gradient`), the output still e exactly.

    h and e are [B, D, H, W] (e a view of the looked-up [N, D] rows). One function for both so that backward writes
    the encoder's gradient, g_out + g_commit * 2 (h - e) / numel, into a single new buffer in h's own layout, and
    saves the features the caller holds anyway: no flattened copy kept for backward, no layout copy in backward.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, quantized: torch.Tensor, rotation_trick: bool = False, unit: bool = False):
        ctx.save_for_backward(h, quantized)
        ctx.rotation_trick, ctx.unit = rotation_trick, unit
        commitment = torch.linalg.vector_norm(h - quantized).pow(2) / h.numel()
        return quantized, commitment

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_commitment: torch.Tensor):
        h, quantized = ctx.saved_tensors
        scale = grad_commitment * (2.0 / h.numel())
        if ctx.rotation_trick:
            return _rotated_gradient(h, quantized, grad_out.to(h.dtype), scale, unit=ctx.unit), None, None, None
        grad = torch.sub(h, quantized).mul_(scale)
        return grad.add_(grad_out), None, None, None


def _rotated_gradient(
    e: torch.Tensor, q: torch.Tensor, g: torch.Tensor, commitment_scale: torch.Tensor, *, unit: bool
) -> torch.Tensor:
    """The encoder's gradient with the rotation trick (Fifty et al. 2024, section 4.2), reductions along dim 1:
    lambda R^T g + commitment_scale * (e - q), for features e, their codes q and the output's gradient g.

    Per position, with e^ = e/||e||, q^ = q/||q||, r = (e^ + q^)/||e^ + q^||, the forward pass is treated as
    out = sg(lambda R) e with lambda = ||q||/||e|| (exactly 1 when `unit`: both on the sphere) and

        R = I - 2 r r^T + 2 q^ e^^T,

    the rotation in the plane of e and q that carries e^ onto q^ (the product of the reflections I - 2 q^ q^^T and
    I - 2 r r^T), so out = q. With ||e^ + q^||^2 = 2 (1 + cos), cos = e^ . q^:

        R^T g = g + (2 q^.g - t) e^ - t q^,    t = (e^.g + q^.g) / (1 + cos),

    i.e. lambda g + c_e e + c_q q with per-position scalars c_e, c_q from five reductions over D (||e||, ||q||,
    e.q, e.g, q.g): no D x D matrix and no r, e^ or q^ vectors. In e's dtype: float32 in the quantizer, whatever
    the autocast dtype.

    Degenerate positions, chosen on the device by `torch.where` (no host sync), never NaN:
      - e = 0 or q = 0 (R, lambda undefined), or a norm <= NORM_FLOOR, where lambda and c_e ~ ||q|| / ||e||^2
        would reach float32's range (the floor of vector-quantize-pytorch's safe division): the identity, i.e. the
        straight-through gradient g;
      - 1 + cos <= ANTIPODAL (e^ = -q^ to within 0.8 degrees, where R stops being unique and t's rounding error
        grows as eps / (1 + cos)): t is taken as 0, which makes R = I - 2 e^ e^^T, the reflection that also
        maps e^ onto q^ = -e^ (vector-quantize-pytorch's result at e^ = -q^, where its normalised r is 0).

    Memory: one new N x D buffer, as the straight-through path: it holds e*g, e*e, q*g, e*q for the reductions and
    then the gradient; beyond it, about a dozen transient [N] scalars (what a D-wide buffer costs at D ~ 12). Time:
    about 4x the straight-through backward on a CPU (8.4 vs 2.0 ms at N = 16384, D = 64, one thread), mostly the
    passes that mix the features' [B, D, H, W] layout with the codes' [N, D] rows (q*g, e*q, e - q).
    """
    buffer = torch.mul(e, g)
    eg = buffer.sum(1, keepdim=True)
    qg = torch.mul(q, g, out=buffer).sum(1, keepdim=True)
    eq = torch.mul(e, q, out=buffer).sum(1, keepdim=True)
    e_norm = _norm_along_1(e, buffer)
    q_norm = _norm_along_1(q, buffer)
    valid = (e_norm > NORM_FLOOR) & (q_norm > NORM_FLOOR)
    e_norm = torch.where(valid, e_norm, 1.0)  # safe divisors; the invalid positions' values are discarded below
    q_norm = torch.where(valid, q_norm, 1.0)
    scale = torch.ones_like(e_norm) if unit else torch.where(valid, q_norm / e_norm, 1.0)
    qg = qg.div_(q_norm)  # q^.g
    one_plus_cos = eq.div_(e_norm * q_norm).add_(1.0)
    t = torch.where(one_plus_cos > ANTIPODAL, eg.div_(e_norm).add_(qg) / one_plus_cos, 0.0)
    c_e = torch.where(valid, scale * (2.0 * qg - t) / e_norm, 0.0)
    c_q = torch.where(valid, -scale * t / q_norm, 0.0)
    grad = torch.sub(e, q, out=buffer).mul_(commitment_scale)  # the commitment term as the plain path computes it
    return grad.addcmul_(g, scale).addcmul_(e, c_e).addcmul_(q, c_q)


def _norm_along_1(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """||x|| along dim 1 (keepdim). A strided reduction (dim 1 not innermost, as in NCHW features) by
    `vector_norm` is several times slower on a CPU than squaring into `scratch` (x's shape) and summing."""
    if x.stride(1) == 1:
        return torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return torch.mul(x, x, out=scratch).sum(1, keepdim=True).sqrt_()


class VectorQuantizer(Bottleneck):
    """Nearest-code quantizer with EMA or gradient-trained codebook, k-means init, restarts and usage statistics."""

    FLOAT32_STATE = ("codebook", "ema_count", "ema_sum", "ema_sq_error")

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.dim = self.in_channels = config.dim
        self.vocab_size = k = config.codebook_size
        init = torch.randn(k, config.dim)  # the run's seeded RNG, as every other weight
        if config.l2_normalize:
            init = F.normalize(init, dim=1)
        if config.ema:
            self.register_buffer("codebook", init)
        else:
            self.codebook = nn.Parameter(init)
        # EMA state, debiased by 1 - decay ** ema_steps; counts are kept in both modes (usage, dead codes).
        self.register_buffer("ema_count", torch.zeros(k))
        self.register_buffer("ema_sum", torch.zeros(k, config.dim) if config.ema else torch.zeros(0))
        self.register_buffer("ema_sq_error", torch.zeros(()))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.full((k,), NEVER, dtype=torch.long))
        self.register_buffer("restarts_total", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not config.kmeans_init))
        # Seeds the restart and k-means draws (with the step): drawn from the run's RNG, saved, so a resumed or
        # reloaded quantizer draws exactly as the original would have.
        self.register_buffer("rng_seed", torch.randint(0, 1 << 62, ()))
        self._pending: torch.Tensor | None = None  # see _pending_views
        self._has_pending = False
        self._recent: torch.Tensor | None = None
        self._reservoir: list[torch.Tensor] = []
        self._reservoir_kept = 0  # reservoir entries from steps that were not skipped
        self._initialized_cache = not config.kmeans_init

    # ------------------------------------------------------------------------------------------------------------
    # Keep the codebook and its statistics float32 under .to(dtype), .half(), .bfloat16().

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        before = {
            name: t.detach()
            for name, t in [*self._parameters.items(), *self._buffers.items()]
            if name in self.FLOAT32_STATE and t is not None
        }
        super()._apply(fn, recurse)
        for name, old in before.items():
            current = self._parameters[name] if name in self._parameters else self._buffers[name]
            if current.dtype != torch.float32:
                restored = old.to(device=current.device)
                if name in self._parameters:
                    current.data = restored
                else:
                    self._buffers[name] = restored
        return self

    # ------------------------------------------------------------------------------------------------------------
    # Forward, encode, decode

    def forward(self, h: torch.Tensor, accumulate: bool = True) -> BottleneckOutput:
        """Quantize features [B, dim, h, w]; in training mode, also gather this batch's statistics for the next
        `on_optimizer_step` (unless `accumulate` is False: a residual VQ's level whose input is not final yet)."""
        self.check_features(h)
        b, _, height, width = h.shape
        features = self._prepared(h)
        z = rearrange(features.detach(), "b d h w -> (b h w) d")  # rows for the search and the statistics
        codebook = self.code_vectors()
        codes = nearest_code(z, codebook.detach(), chunk_elements=self.config.search_chunk, method=self.config.search)
        quantized = F.embedding(codes, codebook)
        as_grid = lambda rows: rearrange(rows, "(b h w) d -> b d h w", b=b, h=height, w=width)  # noqa: E731 (a view)
        out, commitment = _QuantizeWithCommitment.apply(
            features, as_grid(quantized.detach()), self.config.rotation_trick, self.config.l2_normalize
        )
        loss = self.config.beta * commitment
        terms = {"commitment": commitment}
        if not self.config.ema:
            terms["codebook"] = F.mse_loss(quantized, z)
            loss = loss + self.config.codebook_weight * terms["codebook"]
        counts = code_counts(codes, self.vocab_size)
        if self.training and accumulate:
            self._accumulate(z, codes, counts, commitment.detach())
        out = out.to(h.dtype)
        stats = {"perplexity": perplexity(counts), "quant_error": commitment.detach()}
        return BottleneckOutput(
            z=out, loss=loss, terms=terms, stats=stats, codes=rearrange(codes, "(b h w) -> b h w", b=b, h=height)
        )

    @torch.no_grad()
    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Features [B, dim, h, w] -> codes LongTensor [B, h, w] (an empty batch gives empty codes)."""
        self.check_features(h)
        b, _, height, width = h.shape
        z = rearrange(self._prepared(h), "b d h w -> (b h w) d")
        codes = nearest_code(z, self.code_vectors(), chunk_elements=self.config.search_chunk,
                             method=self.config.search)
        return codes.view(b, height, width)  # (not einops, which cannot infer a size from an empty batch)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> decoder input [B, dim, h, w] (float32: the codebook's dtype)."""
        codes = check_codes(codes, self.vocab_size)
        return rearrange(F.embedding(codes, self.code_vectors()), "b h w d -> b d h w")

    def code_vectors(self) -> torch.Tensor:
        """The codebook as used for search and lookup (unit-norm rows when l2_normalize)."""
        if self.config.l2_normalize and not self.config.ema:
            return F.normalize(self.codebook, dim=1)
        return self.codebook

    def _prepared(self, h: torch.Tensor) -> torch.Tensor:
        """Features as the codes see them: float32, unit-norm along D when l2_normalize."""
        h = h.float()
        return F.normalize(h, dim=1) if self.config.l2_normalize else h

    # ------------------------------------------------------------------------------------------------------------
    # Accumulation between optimizer steps (forward, training mode)

    def _generator(self, salt: int) -> torch.Generator:
        """Deterministic per (seed, step, purpose), so the k-means reservoir and initialisation are reproducible and
        resume exactly. Reads two buffers on the host: only before the codebook is initialised."""
        return torch.Generator().manual_seed(hash((int(self.rng_seed), int(self.steps), salt)) & ((1 << 63) - 1))

    @torch.no_grad()
    def _accumulate(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor, sq_error: torch.Tensor) -> None:
        if not self._initialized():
            self._collect_reservoir(z)
            return
        p = self._pending_views(z.device, fresh=not self._has_pending)
        self._has_pending = True
        p["count"] += counts
        if self.config.ema:
            p["sum"].index_add_(0, codes, z)
        p["sq_error"] += sq_error.float() * z.numel()
        p["n"] += z.shape[0]
        self._recent = z  # restart candidates are drawn from the last micro-batch, in the step hook

    def _initialized(self) -> bool:
        """`initialized` buffer, read from the device once and then cached (it never goes back to False). The
        cache is set at construction, by the k-means initialisation and when a state dict is loaded, so a training
        step never reads it."""
        if not self._initialized_cache:
            self._initialized_cache = bool(self.initialized)
        return self._initialized_cache

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_cache = False
        self._initialized()  # read now, while loading, rather than in the first training step

    def _pending_views(self, device: torch.device, *, fresh: bool) -> dict[str, torch.Tensor]:
        """Named views of one flat float32 buffer holding what forward gathers between optimizer steps (counts,
        squared error, vector count, EMA sums, restart candidates), so that the step hook all-reduces it in place
        in one call. The buffer lives across steps; `fresh` zeroes it."""
        k, d = self.codebook.shape
        sizes = {"count": k, "sq_error": 1, "n": 1, "sum": k * d if self.config.ema else 0,
                 "candidates": k * d if self.config.dead_threshold > 0 else 0}
        if self._pending is None or self._pending.device != device:
            self._pending = torch.zeros(sum(sizes.values()), device=device)
        elif fresh:
            self._pending.zero_()
        views, offset = {}, 0
        for name, size in sizes.items():
            views[name] = self._pending[offset : offset + size]
            offset += size
        views["sum"], views["candidates"] = views["sum"].view(-1, d), views["candidates"].view(-1, d)
        views["sq_error"], views["n"] = views["sq_error"][0], views["n"][0]
        return views

    def _draw_candidates(self, candidates: torch.Tensor) -> None:
        """Fill restart candidates [K, D]: code k's row is a random recent vector of rank (k mod W), zero elsewhere,
        so that after the sum all-reduce every rank holds the same candidates."""
        recent, self._recent = self._recent, None
        if recent is None:
            return
        k = candidates.shape[0]
        rank, world = dist.rank(), dist.world_size()
        mine = torch.arange(rank, k, world, device=candidates.device)
        picks = random_indices(self.rng_seed, self.steps, rank, mine, recent.shape[0])
        candidates[mine] = recent[picks]

    def _collect_reservoir(self, z: torch.Tensor) -> None:
        have = sum(len(r) for r in self._reservoir)
        need = self._reservoir_per_rank() - have
        if need > 0:
            take = torch.randperm(z.shape[0], generator=self._generator(salt=have))[:need]
            self._reservoir.append(z[take.to(z.device)].clone())

    def transient_state(self) -> dict[str, torch.Tensor]:
        """This rank's state that lives between optimizer steps and is not a buffer: the k-means reservoir while
        it fills. A training checkpoint saves it (per rank) so resuming is exact; empty once initialised."""
        if self._initialized() or not self._reservoir_kept:
            return {}
        return {"kmeans_reservoir": torch.cat(self._reservoir[: self._reservoir_kept]).cpu().contiguous()}

    def load_transient_state(self, state: dict[str, torch.Tensor]) -> None:
        reservoir = state.get("kmeans_reservoir")
        self._reservoir = [reservoir.to(self.codebook.device)] if reservoir is not None else []
        self._reservoir_kept = len(self._reservoir)

    def _reservoir_per_rank(self) -> int:
        return math.ceil(self.config.kmeans_reservoir / dist.world_size())

    # ------------------------------------------------------------------------------------------------------------
    # Once per optimizer step

    @torch.no_grad()
    def on_optimizer_step(self, skipped: bool | torch.Tensor = False) -> dict[str, torch.Tensor]:
        """Apply what forward gathered since the last optimizer step: the all-reduce, the EMA update, usage, dead-code
        restarts (or, before initialisation, the k-means reservoir and initialisation).

        `skipped` is a Python bool or a 0-d bool tensor decided on the device. True as a bool drops what was
        gathered and returns {}. As a tensor it is never read on the host once the codebook is initialised: the
        step runs (every rank joins the all-reduce) and each buffer update is masked, so a skipped step leaves every
        buffer (steps, EMA state, codebook, usage, restarts) as it was, and the returned stats report no restarts.
        Restart draws depend on the saved `steps`, which a skipped step does not advance, so the next applied step
        draws what it would have drawn without the skip. Before initialisation a tensor is read (this may sync).
        """
        had_pending, self._has_pending = self._has_pending, False
        keep = applied_mask(skipped)
        if keep is not None and not self._initialized():
            skipped, keep = bool(skipped), None  # the k-means phase may synchronise (once per run)
        if keep is None and skipped:
            self._recent = None
            del self._reservoir[self._reservoir_kept :]  # vectors of a skipped (perhaps non-finite) step
            return {}
        self._reservoir_kept = len(self._reservoir)
        if not self._initialized():
            return self._maybe_kmeans_init()
        if not had_pending and dist.world_size() == 1:
            return {}
        p = self._pending_views(self.codebook.device, fresh=not had_pending)  # every rank joins the all-reduce
        if self.config.dead_threshold > 0:
            self._draw_candidates(p["candidates"])
        dist.all_reduce_sum_(self._pending)
        record_step(self.steps, self.last_used, p["count"], keep)
        sq_error = p["sq_error"] / p["n"].clamp_min(1) / self.dim
        self._update_ema(p["count"], p["sum"] if self.config.ema else None, sq_error, keep)
        # the perplexity of the whole step: its micro-batches' (and processes') counts, not a mean of theirs
        stats = {"perplexity": perplexity(p["count"])}
        if self.config.dead_threshold > 0:
            restarted = self._restart_dead_codes(p["candidates"], keep)
            self.restarts_total += restarted
            # every dead code found by this step is restarted: report them as found, before their revival
            stats.update(dead=restarted, restarted=restarted.clone())
        return {**self.codebook_stats(), **stats}

    def _update_ema(
        self, count: torch.Tensor, total: torch.Tensor | None, sq_error: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        """The EMA step of the module docstring; with `keep` (a 0-d bool tensor) False, a no-op (masked)."""
        g = self.config.decay
        if keep is None:
            self.ema_steps += 1
            self.ema_count.mul_(g).add_(count, alpha=1 - g)
            self.ema_sq_error.mul_(g).add_(sq_error, alpha=1 - g)
        else:
            self.ema_steps += keep.long()
            # the same operations as the plain step out of place, so an applied masked step is bitwise the same
            _assign(self.ema_count, torch.mul(self.ema_count, g).add_(count, alpha=1 - g), keep)
            _assign(self.ema_sq_error, torch.mul(self.ema_sq_error, g).add_(sq_error, alpha=1 - g), keep)
        if total is None:
            return
        if keep is None:
            self.ema_sum.mul_(g).add_(total, alpha=1 - g)
        else:
            _assign(self.ema_sum, torch.mul(self.ema_sum, g).add_(total, alpha=1 - g), keep)
        bias = self._bias()
        eps = self.config.eps
        # e + (m^ - N^ e) / (N^ + eps) = (m^ + eps e) / (N^ + eps); an unused code (m^ = N^ = 0) stays bit-exact.
        # In place, with one K x D temporary (two when masked).
        n_hat = (self.ema_count / bias)[:, None]
        step = self.codebook * -n_hat
        step.addcdiv_(self.ema_sum, bias).div_(n_hat + eps)
        if keep is None:
            self.codebook.add_(step)
            if self.config.l2_normalize:
                self.codebook.copy_(F.normalize(self.codebook, dim=1))
            return
        updated = step.add_(self.codebook)
        _assign(self.codebook, F.normalize(updated, dim=1) if self.config.l2_normalize else updated, keep)

    def _restart_dead_codes(self, candidates: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Move dead codes onto their candidates (by `torch.where`: no data-dependent shapes); returns how many, as a
        0-d int64 tensor on the device (0 when `keep` is False)."""
        bias = self._bias()
        dead, threshold = self._dead_codes()
        if keep is not None:
            dead &= keep
        fresh = F.normalize(candidates, dim=1) if self.config.l2_normalize else candidates
        self.codebook.data.copy_(torch.where(dead[:, None], fresh, self.codebook))
        self.ema_count.copy_(torch.where(dead, threshold * bias, self.ema_count))
        if self.config.ema:
            self.ema_sum.copy_(torch.where(dead[:, None], (threshold * bias) * fresh, self.ema_sum))
        return dead.sum()

    def _maybe_kmeans_init(self) -> dict[str, torch.Tensor]:
        have = sum(len(r) for r in self._reservoir)
        device = self.codebook.device
        ready = dist.all_reduce_min_(torch.tensor([float(have >= self._reservoir_per_rank())], device=device))
        if not bool(ready.item()):
            return {}
        local = torch.cat(self._reservoir)[: self._reservoir_per_rank()].to(device)
        self._reservoir, self._reservoir_kept = [], 0
        data = dist.all_gather_cat(local)
        centres, _ = kmeans(
            data,
            self.vocab_size,
            iters=self.config.kmeans_iters,
            generator=self._generator(salt=-1),
            spherical=self.config.l2_normalize,
            chunk_elements=self.config.search_chunk,
        )
        dist.broadcast_(centres)  # identical on every rank even where kernels are not bitwise deterministic
        self.codebook.data.copy_(centres)
        self.ema_count.zero_()
        if self.config.ema:
            self.ema_sum.zero_()
        self.ema_steps.zero_()
        self.initialized.fill_(True)
        self._initialized_cache = True
        return {"kmeans_samples": torch.tensor(float(data.shape[0]))}

    def _bias(self) -> torch.Tensor:
        """The EMA debiasing factor 1 - decay^t (t = ema_steps, at least 1): a 0-d float32 tensor computed on the
        buffers' device in float64, so that no step reads `ema_steps` on the host."""
        t = self.ema_steps.clamp_min(1).double()
        return (1 - torch.pow(self.config.decay, t)).float()

    def _dead_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of dead codes, threshold): debiased count below dead_threshold x the expected count per code
        (with restarts off, dead_threshold is 0 and 'dead' means never assigned in the EMA's memory)."""
        counts = self.ema_count / self._bias()
        threshold = self.config.dead_threshold * counts.sum() / self.vocab_size
        dead = counts < threshold if self.config.dead_threshold > 0 else counts == 0
        return dead, threshold

    # ------------------------------------------------------------------------------------------------------------
    # Statistics from the saved state

    @torch.no_grad()
    def codebook_stats(self) -> dict[str, torch.Tensor]:
        """Codebook health from the buffers saved with the model: usage over the recent window, dead codes, EMA
        perplexity, EMA quantization error (mean squared error per element), restarts so far."""
        counts = self.ema_count / self._bias()
        recent = self.last_used > self.steps - self.config.usage_window
        return {
            "usage": recent.float().mean(),
            "dead": self._dead_codes()[0].sum(),
            "ema_perplexity": perplexity(counts),
            "ema_quant_error": self.ema_sq_error / self._bias(),
            "restarts_total": self.restarts_total.clone(),
        }

