"""Lookup-free quantization (LFQ; Yu et al. 2023, "Language Model Beats Diffusion", MAGVIT-v2) and, with `spherical`,
binary spherical quantization (BSQ; Zhao et al. 2024).

Each of the d = `bits` channels is quantized to its sign: the implicit codebook is {-s, +s}^d, 2^d codes, with s = 1
(LFQ) or s = 1/sqrt(d) (BSQ, whose features u are first l2-normalised over the d channels, so codes and features lie
on the unit sphere). Write u for what is quantized: u = z (LFQ) or u = z / ||z|| (BSQ).

Codes: bit i of a code is (u_i > 0), so a feature exactly 0 (and -0.0) takes the bit 0, the value -s, as
vector-quantize-pytorch's `LFQ` does (`torch.where(x > 0, 1, -1)`). The index is the bits as a binary number, channel
0 least significant: idx = sum_i bit_i 2^i (FSQ's channel-0-fastest basis with two levels per channel). The peer's
basis is the reverse, channel 0 most significant (its `mask` is 2^(d-1) .. 1): its index is ours with the d bits
reversed; the codes as vectors are the same.

Gradient: straight-through, d out / d u = identity (an autograd function whose output is exactly +-s, not
u + (q - u), which may miss q by an ulp); for BSQ the gradient then goes through the normalisation.

Loss (MAGVIT-v2's, with vector-quantize-pytorch's arguments in brackets):

    beta * mean((u - sg(q))^2) + entropy_weight * (H_sample - diversity_weight * H_batch)
    [commitment_loss_weight]     [entropy_loss_weight]            [diversity_gamma]

The soft assignment of a feature to the codes is p(c | u) = softmax_c(2 u.c / temperature) over all 2^d codes c
[inv_temperature = 1 / temperature], i.e. a softmax of minus the squared distance ||u - c||^2 / temperature (||c|| is
the same for every code). Because u.c = sum_i u_i c_i with c_i = +-s independently, it factorises over the bits:

    p(c | u) = prod_i p(c_i | u_i),    p(c_i = +s | u_i) = sigmoid(a_i),    a_i = 4 s u_i / temperature.

- H_sample = mean_n H(p(. | u_n)) is then exactly sum_i of binary entropies, computed from the logits with
  logsigmoid (stable at any temperature): O(N d), never the 2^d codes.
- H_batch = H(mean_n p(. | u_n)), the entropy of the batch-average assignment, does not factorise (a mixture of
  product distributions is not one). With G groups of channels (contiguous, of at most g = `entropy_group_bits` bits,
  balanced: d = 18, g = 9 gives 9 + 9; d = 13, g = 9 gives 7 + 6), vqtok computes

      H_batch = sum_G H(mean_n p(c_G | u_n)),   p(c_G | u_n) = prod_{i in G} p(c_i | u_n,i)   [2^|G| values]

  The mean over the batch of a group's marginal is the marginal of the batch average, so this is the sum of the
  marginal entropies of the batch-average distribution: exactly the joint entropy with one group (G = 1, g >= d), and
  otherwise >= it (subadditivity), equal if and only if the groups are independent under the batch average. What it
  changes in the loss: the diversity term rewards each group's codes being used uniformly across the batch, but no
  longer penalises dependence between groups (a batch using 2^g codes, the same pattern in every group, scores as
  high as one using all 2^d); the per-sample term and the commitment are unchanged. Both equal their exact values
  at the optimum the loss aims for (confident, uniformly used, independent bits). Open-MAGVIT2 factorises its 18-bit
  codes into two groups of 9 in the same way. Default g = 10: the exact loss up to 1,024 codes; balanced groups of
  at most 10 bits beyond. Each group's N x 2^|G| log-probabilities are built bit by bit by broadcasting sums of
  logsigmoids (no matmul, so no TF32 rounding on a GPU); log of the batch mean by logsumexp over the batch (no
  epsilon, unlike the peer's clamp of probabilities at 1e-5). Peak extra memory: O(N 2^g), never N x 2^d.
- The batch is what one forward sees: a micro-batch on one process. (The peer all-reduces its average probabilities
  across processes with a differentiable all-reduce; vqtok keeps collectives out of the forward.)
- Units: nats. With entropy_weight 0 the entropies are not computed (nor logged).

Precision: the normalisation, the sign, the commitment and the entropies run in float32 with autocast off, whatever
dtype the features arrive in; the output is cast back to the features' dtype (exact for LFQ's +-1; BSQ's 1/sqrt(d) is
rounded to that dtype).

Statistics (as FSQ's): forward counts codes and each bit's ones into one plain buffer; `on_optimizer_step`
all-reduces it once per step (every rank joins), advances `steps` and the per-code `last_used` (the only buffers:
usage over the last `usage_window` steps, saved and loaded strictly) and reports the step's perplexity and
`bit_entropy`, the mean over the d bits of the binary entropy (in bits: 1 ideal, 0 for a constant bit) of the
fraction of the step's codes with that bit set. Sync-free: counts by scatter_add, a skipped step given as a 0-d bool
device tensor is applied masked (`torch.where`), never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from vqtok.bottleneck.base import Bottleneck, BottleneckOutput, ImplicitCodebookUsage, check_codes
from vqtok.bottleneck.search import code_counts
from vqtok.config import _finite, _require, _require_size
from vqtok.metrics import perplexity

MAX_BITS = 24  # 16.8M codes: `last_used` alone is 128 MiB; codes fit a token store's int32
DEFAULT_GROUP_BITS = 10  # the batch entropy is exact up to 1,024 codes
DEFAULT_TEMPERATURE = 0.01  # vector-quantize-pytorch's LFQ: inv_temperature 100
MIN_TEMPERATURE = 1e-6  # keeps the bits' logits 4 s u / temperature finite in float32 for any |u| < 1e32
MAX_GROUP_BITS = 16  # a group's N x 65,536 probabilities


@dataclass(frozen=True)
class LFQConfig:
    """Lookup-free quantization: `bits` sign-quantized channels give 2^bits codes (10 bits = 1,024). The width `dim` is
    `bits`, not a key (the autoencoder's 1x1 convs project `latent_channels` to it and back). `spherical`: BSQ,
    features l2-normalised and codes +-1/sqrt(bits). Loss: `beta` * commitment + `entropy_weight` * (per-sample
    entropy - `diversity_weight` * batch entropy), the soft assignment at `temperature` (module docstring).
    `entropy_group_bits`: at most this many bits per group in the batch entropy (None: 10; exact when >= bits).
    `diversity_weight` (None: 1.0), `temperature` (None: 0.01, at least MIN_TEMPERATURE) and `entropy_group_bits`
    shape the entropy loss: with `entropy_weight` 0 there is none, and setting them is refused.
    `usage_window`: the steps over which training usage is counted, as the VQ's."""

    kind: Literal["lfq"] = "lfq"
    bits: int = 10
    spherical: bool = False
    beta: float = 0.25
    entropy_weight: float = 0.1
    diversity_weight: float | None = None
    temperature: float | None = None
    entropy_group_bits: int | None = None
    usage_window: int = 100

    def __post_init__(self) -> None:
        _require(isinstance(self.bits, int) and not isinstance(self.bits, bool) and 1 <= self.bits <= MAX_BITS,
                 f"bits must be an integer in [1, {MAX_BITS}], got {self.bits}")
        for name in ("beta", "entropy_weight", "diversity_weight"):
            value = getattr(self, name)
            _require(value is None or (value >= 0 and _finite(value)), f"{name} must be finite and >= 0, got {value}")
        _require(self.temperature is None or (self.temperature >= MIN_TEMPERATURE and _finite(self.temperature)),
                 f"temperature must be finite and >= {MIN_TEMPERATURE}, got {self.temperature}")
        if self.entropy_group_bits is not None:
            _require(1 <= self.entropy_group_bits <= min(self.bits, MAX_GROUP_BITS),
                     f"entropy_group_bits must be in [1, {min(self.bits, MAX_GROUP_BITS)}] (at most bits, "
                     f"{self.bits}, and {MAX_GROUP_BITS}), got {self.entropy_group_bits}")
        if self.entropy_weight == 0:
            given = [n for n in ("diversity_weight", "temperature", "entropy_group_bits") if getattr(self, n) is not None]
            _require(not given, f"{', '.join(given)} set but entropy_weight is 0, so there is no entropy loss for "
                     f"them to shape: remove {'them' if len(given) > 1 else 'it'} or set entropy_weight > 0")
        else:  # the defaults, written out (a saved config says what was used)
            if self.diversity_weight is None:
                object.__setattr__(self, "diversity_weight", 1.0)
            if self.temperature is None:
                object.__setattr__(self, "temperature", DEFAULT_TEMPERATURE)
        _require(self.usage_window >= 1, f"usage_window must be >= 1, got {self.usage_window}")
        _require_size(self.num_elements, f"bits {self.bits} give usage statistics")

    @property
    def dim(self) -> int:
        return self.bits

    @property
    def vocab_size(self) -> int:
        return 1 << self.bits

    @property
    def code_value(self) -> float:
        """s: the codes' entries are +-s (1, or 1/sqrt(bits) on the sphere)."""
        return 1 / math.sqrt(self.bits) if self.spherical else 1.0

    @property
    def entropy_groups(self) -> tuple[int, ...]:
        """The sizes of the batch entropy's groups of consecutive channels: as equal as possible, each at most
        `entropy_group_bits` (default 10); one group (the exact entropy) when that is >= bits."""
        g = DEFAULT_GROUP_BITS if self.entropy_group_bits is None else self.entropy_group_bits
        k = -(-self.bits // g)
        return tuple(self.bits // k + (1 if i < self.bits % k else 0) for i in range(k))

    @property
    def num_elements(self) -> int:
        """Elements of the quantizer's buffers: last use per code, the step counter."""
        return self.vocab_size + 1


# ----------------------------------------------------------------------------------------------------------------
# The entropies, from the bits' logits a [N, d]: p(c_i = +s | u) = sigmoid(a_i)


def sample_entropy(logits: torch.Tensor) -> torch.Tensor:
    """mean_n H(p(. | u_n)) in nats, exactly: the entropy of a product of independent bits is the sum of the bits'
    binary entropies, -(sigmoid(a) logsigmoid(a) + sigmoid(-a) logsigmoid(-a)) each (finite at any |a|)."""
    h = -(torch.sigmoid(logits) * F.logsigmoid(logits) + torch.sigmoid(-logits) * F.logsigmoid(-logits))
    return h.sum(dim=1).mean()


def group_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Logits [N, g] -> log p(c | u_n) [N, 2^g] for the 2^g codes c of these g bits (index sum_i bit_i 2^i), built bit
    by bit: log p = sum_i logsigmoid(+-a_i), sums of non-positive terms (no cancellation, no matmul)."""
    n, g = logits.shape
    signs = torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=2)  # [N, g, 2]: bit 0, bit 1
    log_p = logits.new_zeros(n, 1)
    for i in range(g):  # bit i becomes the most significant so far: [N, 2, 2^i] -> [N, 2^(i+1)]
        log_p = (signs[:, i, :, None] + log_p[:, None, :]).reshape(n, -1)
    return log_p


def mean_distribution_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """H(mean_n p_n) in nats from log p_n [N, K]: log of the mean by logsumexp over the batch (exact, no epsilon)."""
    log_q = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    return -(log_q.exp() * log_q).sum()


def batch_entropy(logits: torch.Tensor, groups: tuple[int, ...]) -> torch.Tensor:
    """sum over the groups of consecutive channels (sizes `groups`, summing to d) of the entropy of the group's
    batch-average marginal: H(mean_n p(. | u_n)) exactly with one group, an upper bound otherwise (module docstring).
    Peak extra memory O(N 2^max(groups))."""
    total, start = logits.new_zeros(()), 0
    for size in groups:
        total = total + mean_distribution_entropy(group_log_probs(logits[:, start:start + size]))
        start += size
    return total


class _SignStraightThrough(torch.autograd.Function):
    """+s where u > 0, else -s, forward (exactly); the identity backward."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, value: float) -> torch.Tensor:
        return torch.where(u > 0, value, -value).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sign_ste(u: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """+value where u > 0, -value elsewhere (0 included), with the straight-through gradient d out / d u = 1."""
    return _SignStraightThrough.apply(u, value)


class LookupFreeQuantizer(ImplicitCodebookUsage, Bottleneck):
    """LFQ (BSQ with `spherical`) behind the `Bottleneck` interface: codes [B, h, w] in [0, 2^bits), no parameters,
    the commitment and entropy loss."""

    def __init__(self, config: LFQConfig):
        super().__init__()
        self.config = config
        self.dim = self.in_channels = config.bits
        self.vocab_size = config.vocab_size
        self.register_buffer("_powers", 1 << torch.arange(config.bits, dtype=torch.long), persistent=False)
        self._register_usage(self.vocab_size, extra=config.bits)  # code counts, then each bit's ones

    # ------------------------------------------------------------------------------------------------------------
    # The quantizer

    def prepared(self, h: torch.Tensor) -> torch.Tensor:
        """Features [B, d, h, w] -> u in float32 (l2-normalised over the d channels for BSQ), autocast off."""
        with torch.autocast(h.device.type, enabled=False):
            u = h.float()
            return F.normalize(u, dim=1) if self.config.spherical else u

    def _indices(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, d, h, w] -> code indices LongTensor [B, h, w]: sum_i (u_i > 0) 2^i."""
        return ((u.detach() > 0).long() * self._powers.view(1, -1, 1, 1)).sum(dim=1)

    def forward(self, h: torch.Tensor) -> BottleneckOutput:
        self.check_features(h)
        c = self.config
        with torch.autocast(h.device.type, enabled=False):
            u = self.prepared(h)
            q = sign_ste(u, c.code_value)
            commitment = F.mse_loss(u, q.detach())
            terms = {"commitment": commitment}
            loss = c.beta * commitment
            if c.entropy_weight > 0 and u.numel():
                logits = rearrange(u, "b d h w -> (b h w) d") * (4 * c.code_value / c.temperature)
                terms["sample_entropy"] = sample_entropy(logits)
                terms["batch_entropy"] = batch_entropy(logits, c.entropy_groups)
                loss = loss + c.entropy_weight * (terms["sample_entropy"]
                                                  - c.diversity_weight * terms["batch_entropy"])
        codes = self._indices(u)
        counts = code_counts(codes, self.vocab_size)
        if self.training:
            ones = (u.detach() > 0).float().sum(dim=(0, 2, 3))
            self._accumulate(torch.cat([counts, ones]))
        return BottleneckOutput(z=q.to(h.dtype), loss=loss, terms=terms, stats={"perplexity": perplexity(counts)},
                                codes=codes)

    @torch.no_grad()
    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Features [B, bits, h, w] -> codes LongTensor [B, h, w]."""
        self.check_features(h)
        return self._indices(self.prepared(h))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> decoder input [B, bits, h, w] (float32)."""
        codes = check_codes(codes, self.vocab_size)
        return rearrange(self.codes_to_vectors(codes), "b h w d -> b d h w")

    def code_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [...] -> their bits [..., d] as bool, channel 0 the least significant."""
        return (codes.long()[..., None] & self._powers) != 0

    def codes_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [...] -> the implicit codebook's vectors [..., d] in float32 (+-s), what forward gives the
        decoder (channel-last; `decode` takes [B, h, w] and gives [B, d, h, w])."""
        s = self.config.code_value
        return torch.where(self.code_bits(codes), s, -s).float()

    def vectors_to_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Vectors [..., d] -> code indices [...] (the sign of each entry; the inverse of `codes_to_vectors`)."""
        return ((vectors > 0).long() * self._powers).sum(dim=-1)

    # ------------------------------------------------------------------------------------------------------------
    # Statistics, once per optimizer step

    def on_optimizer_step(self, skipped: bool | torch.Tensor = False) -> dict[str, torch.Tensor]:
        """All-reduce the step's code and bit counts (one call; every rank joins), then advance `steps` and
        `last_used` (`ImplicitCodebookUsage`; a skipped step's 0-d bool tensor is never read, its updates masked).
        Returns the step's perplexity and bit entropy (over all its micro-batches and ranks) and `codebook_stats`;
        {} when nothing is applied."""
        packed = self._reduce_step(skipped)
        if packed is None:
            return {}
        counts, ones = packed[: self.vocab_size], packed[self.vocab_size :]
        return {**self.codebook_stats(), "perplexity": perplexity(counts),
                "bit_entropy": bit_entropy(ones, counts.sum())}


def bit_entropy(ones: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Each bit's count of ones [d] among `total` codes -> the mean over bits of the binary entropy of its frequency,
    in bits (1: every bit balanced; 0 with no codes)."""
    f = ones / total.clamp_min(1)
    return -(torch.special.xlogy(f, f) + torch.special.xlogy(1 - f, 1 - f)).mean() / math.log(2)


__all__ = ["LFQConfig", "LookupFreeQuantizer", "batch_entropy", "bit_entropy", "sample_entropy", "sign_ste"]
