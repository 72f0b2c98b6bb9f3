"""Lloyd's k-means for codebook initialisation, on the exact chunked search (optionally spherical)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqtok.bottleneck.search import code_counts, nearest_code


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int,
    generator: torch.Generator,
    spherical: bool = False,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of x [M, D] (M >= k) into k centres; returns (centres [k, D], counts [k]) in float32.

    Centres start at k distinct random rows. A cluster left empty by an iteration is re-seeded at a random row, so
    every centre ends on the data. `spherical` keeps centres on the unit sphere (for L2-normalised codes).
    """
    x = x.float()
    m = x.shape[0]
    if m < k:
        raise ValueError(f"k-means needs at least k={k} samples, got {m}")
    perm = torch.randperm(m, generator=generator)[:k].to(x.device)
    centres = x[perm].clone()
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = nearest_code(x, centres, chunk_elements=chunk_elements)
        counts = code_counts(assign, k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0
        centres = torch.where(filled[:, None], sums / counts.clamp_min(1.0)[:, None], centres)
        empty = (~filled).nonzero().flatten()
        if empty.numel():
            centres[empty] = x[torch.randint(m, (empty.numel(),), generator=generator).to(x.device)]
        if spherical:
            centres = F.normalize(centres, dim=1)
    return centres, counts
