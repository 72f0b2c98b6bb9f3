"""Exact, memory-lean nearest-code search.

argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z . e_k): ||z||^2 is constant per row and never computed. The
distances are formed one chunk of rows at a time with a single `addmm` and reduced to an argmin at once, so the
largest temporary is `chunk_elements` floats, never the full N x K matrix. Everything runs in float32 with autocast
and TF32 off, and both sides are centred on the codebook mean first (distances are unchanged by a common shift, but
the cancellation in the expansion shrinks with the norms), which is what keeps the choice exact under bf16 training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 21  # 8 MiB of float32 distances per chunk


@contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """Autocast off and, on CUDA, TF32 off for matmuls, restored on exit."""
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
            old = matmul.fp32_precision
            matmul.fp32_precision = "ieee"
            try:
                yield
            finally:
                matmul.fp32_precision = old
        else:
            old = matmul.allow_tf32
            matmul.allow_tf32 = False
            try:
                yield
            finally:
                matmul.allow_tf32 = old


@torch.no_grad()
def nearest_code(
    z: torch.Tensor, codebook: torch.Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean) for each row of z: [N, D], [K, D] -> LongTensor [N]."""
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code expects z [N, D] and codebook [K, D], got {tuple(z.shape)}, {tuple(codebook.shape)}")
    n, k = z.shape[0], codebook.shape[0]
    out = torch.empty(n, dtype=torch.long, device=z.device)
    with exact_float32(z.device):
        codebook = codebook.float()
        center = codebook.mean(dim=0)
        codes = codebook - center
        codes_t = codes.t()
        sq_norms = codes.pow(2).sum(dim=1)
        rows = max(1, chunk_elements // k)
        for start in range(0, n, rows):
            chunk = z[start : start + rows].float() - center
            dist = torch.addmm(sq_norms, chunk, codes_t, beta=1.0, alpha=-2.0)
            torch.argmin(dist, dim=1, out=out[start : start + rows])
    return out
