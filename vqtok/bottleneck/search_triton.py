"""A Triton kernel fusing the nearest-code search's distances and argmin: no N x K buffer at all.

Each program takes BLOCK_N rows of the centred features, keeps them in registers, and walks the codebook BLOCK_K
codes at a time: scores ||e - c||^2 - 2 (z - c) . (e - c) by `tl.dot` in float32 with input_precision="ieee" (FMA,
no TF32: the same arithmetic as the pure-torch path of `search.py`, in another summation order), then a running
minimum (the first index on ties within a tile, the earlier tile on ties across tiles). Used only on CUDA, when
triton is importable and D <= search.TRITON_MAX_DIM (the rows must fit in registers); `search.nearest_code` centres
the inputs, and its pure-torch path is the reference. Block sizes are a fixed, untuned choice. Importing this module needs triton; `search.py` imports it lazily. Tested on CPU with
TRITON_INTERPRET=1 (tests/test_vq_search.py) against float64 brute force.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqtok.bottleneck.search import TRITON_MAX_DIM as MAX_DIM  # D up to this: one register tile per program

BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _nearest_code_kernel(z_ptr, e_ptr, sq_ptr, out_ptr, n, k, d, stride_z, stride_e,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    z = tl.load(z_ptr + rows[:, None] * stride_z + dims[None, :], mask=(rows[:, None] < n) & (dims[None, :] < d),
                other=0.0)
    z = z * -2.0  # exact: a power of two
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_index = tl.zeros((BLOCK_N,), tl.int64)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        e = tl.load(e_ptr + cols[None, :].to(tl.int64) * stride_e + dims[:, None],
                    mask=(cols[None, :] < k) & (dims[:, None] < d), other=0.0)  # [BLOCK_D, BLOCK_K]
        sq = tl.load(sq_ptr + cols, mask=cols < k, other=float("inf"))
        score = tl.dot(z, e, input_precision="ieee") + sq[None, :]
        tile_best, tile_index = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index.to(tl.int64) + start, best_index)
    tl.store(out_ptr + rows, best_index, mask=rows < n)


def nearest_code_triton(centred: torch.Tensor, codes: torch.Tensor, sq_norms: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = argmin_k (sq_norms[k] - 2 centred[i] . codes[k]) for float32 centred [N, D], codes [K, D],
    sq_norms [K] (D <= MAX_DIM), written into out (int64 [N]). Launches one kernel; nothing is read back."""
    n, d = centred.shape
    k = codes.shape[0]
    if d > MAX_DIM:
        raise ValueError(f"the Triton search takes D <= {MAX_DIM}, got {d}")
    centred, codes, sq_norms = centred.contiguous(), codes.contiguous(), sq_norms.contiguous()
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs every dimension >= 16
    grid = (triton.cdiv(n, BLOCK_N),)
    _nearest_code_kernel[grid](centred, codes, sq_norms, out, n, k, d, centred.stride(0), codes.stride(0),
                               BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=block_d)
