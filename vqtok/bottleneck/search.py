"""Exact, memory-lean nearest-code search.

argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z . e_k): ||z||^2 is constant per row and never computed. The
distances are formed one chunk of rows at a time with a single matmul and reduced to an argmin at once, so the
largest temporary is `chunk_elements` floats, never the full N x K matrix beyond that budget.

The chunk is sized to the device. On a CPU it is small (`default_chunk_elements`: a few MiB that stay near the
caches; tuned, see scripts/bench_vq.py). On CUDA it is `CUDA_BUDGET_BYTES` (1 GiB) or `CUDA_FREE_FRACTION` of the
free device memory, whichever is smaller, queried once per device: a batch whose N x K distances fit is searched in
one chunk (one matmul, one min: no per-chunk Python overhead), a larger one in as few chunks as the budget allows.
Nothing here reads a device value on the host, so the search never synchronises with a GPU.

On CUDA with triton importable and D <= TRITON_MAX_DIM, `method="auto"` (VQConfig.search) uses instead a Triton kernel
that fuses distances and argmin (`search_triton.py`): no N x K buffer at all, which matters most where D is small and
the search is bound by writing and reading that buffer. It does the same float32 arithmetic (FMA, no TF32) on the
same centred inputs. `method="torch"` (the default until the kernel is measured on a GPU) is the pure-torch path: the reference, and
the only one on a CPU; `method="triton"` insists on the kernel (tests, benchmarks). Everything runs in float32 with
autocast and TF32 off, and both sides are centred on the codebook mean first (distances are unchanged by a common shift, but
the cancellation in the expansion shrinks with the norms), which is what keeps the choice exact under bf16 training.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 21  # 8 MiB of float32 distances per chunk
MIN_ROWS = 512
MAX_CHUNK_ELEMENTS = 1 << 25  # 128 MiB
CUDA_BUDGET_BYTES = 1 << 30  # at most 1 GiB of float32 distances per chunk on CUDA ...
CUDA_FREE_FRACTION = 0.25  # ... and at most a quarter of the device memory free when it is first asked
_cuda_chunk_elements: dict[int, int] = {}  # per CUDA device index, from the first search on it
TRITON_MAX_DIM = 64  # the fused kernel keeps a row tile of features in registers
SEARCH_METHODS = ("auto", "torch", "triton")
_triton_module: object = None  # search_triton once imported, False where triton is not importable


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


def default_chunk_elements(k: int) -> int:
    """At least MIN_ROWS rows per chunk (a matmul with fewer rows runs far below peak), 8 MiB of distances at
    least, 128 MiB at most."""
    return min(max(DEFAULT_CHUNK_ELEMENTS, MIN_ROWS * k), MAX_CHUNK_ELEMENTS)


def cuda_chunk_elements(device: torch.device) -> int:
    """The distance budget (in float32 elements) on a CUDA device: min(CUDA_BUDGET_BYTES, CUDA_FREE_FRACTION x the
    free memory), never below DEFAULT_CHUNK_ELEMENTS. Free memory is asked once per device (torch.cuda.mem_get_info)
    and cached: the budget must not change from step to step, nor cost a driver call each time."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cuda_chunk_elements:
        free, _ = torch.cuda.mem_get_info(index)
        budget = min(CUDA_BUDGET_BYTES, int(free * CUDA_FREE_FRACTION))
        _cuda_chunk_elements[index] = max(DEFAULT_CHUNK_ELEMENTS, budget // 4)
    return _cuda_chunk_elements[index]


def device_chunk_elements(device: torch.device, k: int) -> int:
    """The default distance budget for a search on `device` against K codes (see the module docstring)."""
    return cuda_chunk_elements(device) if device.type == "cuda" else default_chunk_elements(k)


def code_counts(codes: torch.Tensor, k: int) -> torch.Tensor:
    """How often each of k codes occurs in `codes` (a LongTensor of any shape), as float32 [k]: `torch.bincount`
    without its host synchronisation on CUDA (bincount reads the maximum to size its output). A scatter-add of ones:
    exact below 2^24 per code, and deterministic (float atomics adding 1.0 commute while exact)."""
    codes = codes.reshape(-1)
    ones = torch.ones((), device=codes.device).expand(codes.shape[0])
    return torch.zeros(k, device=codes.device).scatter_add_(0, codes, ones)


def _triton_search():
    """vqtok.bottleneck.search_triton, imported on first use; None where triton is not installed."""
    global _triton_module
    if _triton_module is None:
        try:
            from vqtok.bottleneck import search_triton
        except ImportError:
            search_triton = False
        _triton_module = search_triton
    return _triton_module or None


def uses_triton(device: torch.device, d: int, method: str = "torch") -> bool:
    """Whether nearest_code takes the fused Triton kernel for D = d on `device` (see the module docstring)."""
    if method not in SEARCH_METHODS:
        raise ValueError(f"method must be one of {', '.join(SEARCH_METHODS)}, got {method!r}")
    if method == "torch":
        return False
    if method == "triton":
        if _triton_search() is None:
            raise RuntimeError("method='triton' needs triton installed")
        if d > TRITON_MAX_DIM:
            raise ValueError(f"method='triton' takes D <= {TRITON_MAX_DIM}, got {d}")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"method='triton' runs on CUDA (or under TRITON_INTERPRET=1), got a {device.type} tensor")
        return True
    return device.type == "cuda" and d <= TRITON_MAX_DIM and _triton_search() is not None


@torch.no_grad()
def nearest_code(
    z: torch.Tensor, codebook: torch.Tensor, *, chunk_elements: int | None = None, method: str = "torch"
) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean) for each row of z: [N, D], [K, D] -> LongTensor [N].

    Rows are processed chunk_elements // K at a time (at least one; None: `device_chunk_elements(device, K)`, all
    rows at once on CUDA when they fit), so the distance buffer never holds more than chunk_elements floats (or one
    row). The chunk's distances are one matmul of [z - c, 1] with [-2 (e - c), ||e - c||^2]^T into
    a single preallocated buffer: no bias copy, no second chunk alive, no heap churn from a fresh buffer per chunk.
    `method`: "torch" (the default), "triton" (the fused kernel, no distance buffer; CUDA, or a
    CPU under TRITON_INTERPRET=1) or "auto" (Triton on CUDA where it applies, else torch). The fused kernel holds
    no distances at all, so chunk_elements (a bound on the torch path's buffer) has nothing to bound there.
    """
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code expects z [N, D] and codebook [K, D], got {tuple(z.shape)}, {tuple(codebook.shape)}")
    n, d = z.shape
    k = codebook.shape[0]
    out = torch.empty(n, dtype=torch.long, device=z.device)
    if n == 0:
        return out
    fused = uses_triton(z.device, d, method)
    rows = min(n, max(1, (chunk_elements or device_chunk_elements(z.device, k)) // k))
    with exact_float32(z.device):
        codebook = codebook.float()
        center = codebook.mean(dim=0)
        codes = codebook - center
        if fused:
            _triton_search().nearest_code_triton(torch.sub(z.float(), center), codes, codes.pow(2).sum(dim=1), out)
            return out
        rhs = torch.cat([codes.t() * -2.0, codes.pow(2).sum(dim=1)[None]])  # [D + 1, K]
        lhs = torch.ones(rows, d + 1, device=z.device)  # last column stays 1: it adds ||e - c||^2
        dist = torch.empty(rows, k, device=z.device)
        best = torch.empty(rows, device=z.device)
        for start in range(0, n, rows):
            m = min(rows, n - start)
            torch.sub(z[start : start + m], center, out=lhs[:m, :d])
            torch.mm(lhs[:m], rhs, out=dist[:m])
            torch.min(dist[:m], dim=1, out=(best[:m], out[start : start + m]))  # faster than argmin on CPU
    return out
