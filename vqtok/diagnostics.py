"""Posterior-collapse diagnostics: what every latent element of a VAE carries, over a dataset.

A VAE whose decoder can do without a latent element lets the posterior of that element fall back onto its prior:
q(z_j | x) = p(z_j) for every image, a KL of zero, and a posterior mean that no longer depends on the image
(posterior collapse; KL warm-up and free bits are meant to prevent it). Two numbers per latent element show it:

- **KL to the prior**, averaged over images: KL(q(z_j | x) || N(0, 1)) for a Gaussian autoencoder, 0.5 (mu^2 +
  sigma^2 - 1 - log sigma^2); for a hierarchical VAE, each group's KL(q(z_l | x, z_<l) || p(z_l | z_<l)) per element
  against its learned prior, with the groups above at their posterior means (the evaluation forward pass, which
  `encode` and a token store use too: deterministic, so the numbers do not depend on a seed). A collapsed element
  has a KL of about 0 nats.
- **The variance over images of its posterior mean**, Cov_x(E_q[z_j]) (unbiased): Burda et al. 2016 call an element
  *active* when it exceeds 0.01 (`ACTIVE_UNIT_THRESHOLD`). A collapsed element has the prior's mean for every image.

`LatentStatistics` accumulates both in float64 (Chan et al.'s pairwise update of the mean and the sum of squared
deviations, not sums of squares, which cancel when the variance is small next to the mean), one tensor per latent
group (the autoencoder has one group, [C, h, w]); `latent_statistics` runs a model over a dataset to fill it, and
`evaluate()` fills one as it goes (vqtok.train.evaluate). Its summaries are per channel (autoencoder), per group
(hierarchical VAE) and overall; `to_dict` gives the full per-element arrays for a person to plot
(`vqtok eval --diagnostics FILE.json`). VQ tokenizers have no posterior: their codes' usage, perplexity and the
fraction never used (`code_unused`, vqtok.metrics.code_usage) say how much of the codebook carries information.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vqtok.bottleneck import DiagonalGaussian
from vqtok.bottleneck.kl import gaussian_kl
from vqtok.images import uint8_to_range
from vqtok.metrics import code_usage
from vqtok.models.hierarchical_vae import GroupPass
from vqtok.nn.conditioning import dataset_labels

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: a latent dimension is active if Cov_x(E_q[z]) > 0.01


class LatentStatistics:
    """Per latent element, over the images added: the average KL to its prior (nats) and the unbiased variance of
    its posterior mean, one float64 tensor per latent group ([C, h, w] each, top group first)."""

    def __init__(self) -> None:
        self.count = 0
        self.kl_sums: list[torch.Tensor] | None = None
        self.mean_of_means: list[torch.Tensor] | None = None
        self.squared_deviations: list[torch.Tensor] | None = None

    def add(self, kl: Sequence[torch.Tensor], means: Sequence[torch.Tensor]) -> None:
        """One batch: per group, the KL of every element [B, C, h, w] and the posterior means [B, C, h, w]."""
        if len(kl) != len(means) or not kl:
            raise ValueError(f"add takes the KL and the posterior means of the same groups, got {len(kl)} and "
                             f"{len(means)}")
        kl = [k.detach().double() for k in kl]
        means = [m.detach().double() for m in means]
        if self.kl_sums is None:
            self.kl_sums = [torch.zeros_like(k[0]) for k in kl]
            self.mean_of_means = [torch.zeros_like(m[0]) for m in means]
            self.squared_deviations = [torch.zeros_like(m[0]) for m in means]
        elif [tuple(k.shape[1:]) for k in kl] != self.shapes:
            raise ValueError(f"latent shapes changed between batches: {self.shapes} then "
                             f"{[tuple(k.shape[1:]) for k in kl]}")
        n = means[0].shape[0]
        total = self.count + n
        for i, (k, m) in enumerate(zip(kl, means)):
            self.kl_sums[i] += k.sum(dim=0)
            batch_mean = m.mean(dim=0)  # Chan et al.: merge the batch's mean and squared deviations into the total
            delta = batch_mean - self.mean_of_means[i]
            self.squared_deviations[i] += (m - batch_mean).pow(2).sum(dim=0) + delta.pow(2) * self.count * n / total
            self.mean_of_means[i] += delta * n / total
        self.count = total

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The shape of every group's latents, [C, h, w] each."""
        return [tuple(s.shape) for s in self._sums()]

    @property
    def units(self) -> int:
        """The number of latent elements, all groups together."""
        return sum(s.numel() for s in self._sums())

    def kl(self) -> list[torch.Tensor]:
        """Per group, the KL of every element to its prior averaged over the images, in nats [C, h, w]."""
        return [s / self.count for s in self._sums()]

    def variance(self) -> list[torch.Tensor]:
        """Per group, the unbiased variance over images of every element's posterior mean [C, h, w] (NaN with fewer
        than 2 images)."""
        self._sums()
        if self.count < 2:
            return [torch.full_like(d, float("nan")) for d in self.squared_deviations]
        return [d / (self.count - 1) for d in self.squared_deviations]

    def active(self, threshold: float = ACTIVE_UNIT_THRESHOLD) -> list[torch.Tensor]:
        """Per group, whether each element is active: its posterior mean's variance over images exceeds
        `threshold` (bool [C, h, w]; none is with fewer than 2 images)."""
        return [v > threshold for v in self.variance()]  # NaN > threshold is False

    def active_units(self, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
        return sum(int(a.sum()) for a in self.active(threshold))

    def kl_per_group(self) -> list[float]:
        """The average KL of every group in nats per image."""
        return [float(k.sum()) for k in self.kl()]

    def active_per_group(self, threshold: float = ACTIVE_UNIT_THRESHOLD) -> list[int]:
        return [int(a.sum()) for a in self.active(threshold)]

    def kl_per_channel(self, group: int = 0) -> list[float]:
        """The average KL of every channel of `group` in nats per image (summed over its positions)."""
        return self.kl()[group].flatten(1).sum(dim=1).tolist()

    def active_per_channel(self, group: int = 0, threshold: float = ACTIVE_UNIT_THRESHOLD) -> list[int]:
        return self.active(threshold)[group].flatten(1).sum(dim=1).tolist()

    def ranking(self, group: int | None = None) -> list[tuple[int, int, int, int]]:
        """Latent elements as (group, channel, y, x), largest average KL first (ties in index order); `group`: that
        group's elements only."""
        groups = range(len(self._sums())) if group is None else [group]
        kl = self.kl()
        where = [(g, *element) for g in groups for element in torch.cartesian_prod(
            *[torch.arange(n) for n in self.shapes[g]]).tolist()]  # row-major, as flatten() orders them
        order = torch.sort(torch.cat([kl[g].flatten() for g in groups]), descending=True, stable=True).indices
        return [where[i] for i in order.tolist()]

    def to_dict(self, threshold: float = ACTIVE_UNIT_THRESHOLD) -> dict[str, Any]:
        """Everything, as JSON holds it: per group its shape and the per-element arrays (KL in nats, variance of the
        posterior mean, active flags; nested lists `[C][h][w]`) with per-channel sums, and every element ordered by
        its KL, largest first. Variances are null with fewer than 2 images."""
        kl, variance, active = self.kl(), self.variance(), self.active(threshold)
        groups = []
        for g, shape in enumerate(self.shapes):
            groups.append({
                "group": g,
                "shape": list(shape),
                "kl_nats": kl[g].tolist(),
                "kl_nats_total": float(kl[g].sum()),
                "kl_nats_per_channel": self.kl_per_channel(g),
                "posterior_mean_variance": variance[g].tolist() if self.count >= 2 else None,
                "active": active[g].tolist(),
                "active_units": int(active[g].sum()),
                "active_per_channel": self.active_per_channel(g, threshold),
            })
        elements = []
        for g, c, y, x in self.ranking():
            elements.append({"group": g, "channel": c, "y": y, "x": x, "kl_nats": float(kl[g][c, y, x]),
                             "posterior_mean_variance": float(variance[g][c, y, x]) if self.count >= 2 else None,
                             "active": bool(active[g][c, y, x])})
        return {"images": self.count, "active_unit_threshold": threshold, "latent_units": self.units,
                "active_units": self.active_units(threshold), "groups": groups, "elements_by_kl": elements}

    def _sums(self) -> list[torch.Tensor]:
        if self.kl_sums is None or self.count == 0:
            raise ValueError("no images were added to these latent statistics")
        return self.kl_sums


class CodeCounts:
    """How often a VQ tokenizer used each of its `vocab_size` codes over the images added (int64, on the codes'
    device). With `depth` (a residual VQ's codes [..., depth]), each level's codes are counted apart: `counts` holds
    depth x vocab_size counts, level after level."""

    def __init__(self, vocab_size: int, depth: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.depth = depth
        self.counts: torch.Tensor | None = None

    def add(self, codes: torch.Tensor) -> None:
        if self.depth is not None:  # level l's code k counted at l * vocab_size + k
            offsets = torch.arange(codes.shape[-1], device=codes.device) * self.vocab_size
            codes = codes.long() + offsets
        counts = torch.bincount(codes.flatten(), minlength=self.vocab_size * (self.depth or 1))
        self.counts = counts if self.counts is None else self.counts + counts

    def level_counts(self) -> list[torch.Tensor]:
        """Each level's counts [vocab_size] (one level without `depth`)."""
        if self.counts is None:
            raise ValueError("no codes were added to these code counts")
        return list(self.counts.view(self.depth or 1, self.vocab_size))

    def usage(self) -> dict[str, float]:
        """`code_usage` of the counts; with `depth`, usage and unused over every level's codes together, the
        perplexity the mean of the levels' (as the residual VQ's training statistics), and each level's as
        `usage/level_l`, `perplexity/level_l`, `unused/level_l`."""
        if self.depth is None:
            return code_usage(self.counts)
        levels = [code_usage(counts) for counts in self.level_counts()]
        out = {**code_usage(self.counts), "perplexity": sum(level["perplexity"] for level in levels) / len(levels)}
        for l, level in enumerate(levels):
            out.update({f"{k}/level_{l}": v for k, v in level.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        """The count of every code and the codes never used, as JSON holds them (per level, with `depth`)."""
        if self.counts is None:
            raise ValueError("no codes were added to these code counts")
        counts = self.level_counts()
        unused = [torch.nonzero(c == 0).flatten().tolist() for c in counts]
        layout = ({"code_counts": counts[0].tolist(), "unused_codes": unused[0]} if self.depth is None else
                  {"depth": self.depth, "code_counts": [c.tolist() for c in counts], "unused_codes": unused})
        return {"vocab_size": self.vocab_size, **layout, **{f"code_{k}": v for k, v in self.usage().items()}}


# ----------------------------------------------------------------------------------------------------------------
# From a model's forward pass


def posterior_passes(model: Any, output: Any) -> list[GroupPass]:
    """Every latent group of an evaluation forward's `output` as a GroupPass (its posterior, the prior it is
    measured against and z = the posterior mean), top group first: the hierarchical VAE's own passes (each prior
    p(z_l | z_<l) given the posterior means above), or the Gaussian autoencoder's one group with the prior N(0, I)."""
    check_variational(model)
    groups = getattr(output, "groups", None)
    if groups is not None:
        return [GroupPass(p.prior, p.posterior, p.posterior.mode()) for p in groups]
    posterior = output.bottleneck.posterior
    standard = torch.zeros_like(posterior.mean)
    return [GroupPass(DiagonalGaussian(standard, standard), posterior, posterior.mode())]


def posterior_terms(passes: Sequence[GroupPass]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per group, the KL of every element to its prior [B, C, h, w] and the posterior means, both in float64 (the KL
    computed from the distributions' parameters in float64, kl.gaussian_kl)."""
    kl = [gaussian_kl(p.posterior.mean.double(), p.posterior.logvar.double(), p.prior.mean.double(),
                      p.prior.logvar.double()) for p in passes]
    return kl, [p.posterior.mode().double() for p in passes]


def check_variational(model: Any) -> None:
    """A clear error for a model without a Gaussian posterior (a VQ tokenizer)."""
    if getattr(model, "kl_objective", None) is None:
        raise ValueError("a VQ tokenizer has no Gaussian posterior whose collapse could be measured (its codes are "
                         "discrete): code_usage, code_perplexity and code_unused say how much of its codebook is used")


@torch.inference_mode()
def latent_statistics(model: Any, dataset: Dataset, *, limit: int | None = None, batch_size: int = 64,
                      num_workers: int = 0, progress: bool = False) -> LatentStatistics:
    """The LatentStatistics of a VAE (Gaussian autoencoder or hierarchical VAE, in eval mode for the pass) over the
    first `limit` images of `dataset` ((uint8 image, label) items; a class-conditional model is given each image's
    label). `evaluate()` gathers the same statistics with its other metrics."""
    check_variational(model)
    was_training = model.training
    model.eval()
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    device = next(model.parameters()).device
    statistics = LatentStatistics()
    bar = tqdm(total=len(dataset), unit="img", desc="latent statistics", disable=not progress)
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        x = uint8_to_range(images.to(device), model.config.value_range)
        output = model(x, **dataset_labels(model, labels))
        statistics.add(*posterior_terms(posterior_passes(model, output)))
        bar.update(images.shape[0])
    bar.close()
    model.train(was_training)
    if statistics.count == 0:
        raise ValueError("latent_statistics: no images (an empty dataset or limit 0)")
    return statistics
