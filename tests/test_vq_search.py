"""Nearest-code search against float64 brute force, under bf16 autocast, across batch sizes and train/eval."""

import pytest
import torch

from vqtok.bottleneck import VectorQuantizer, nearest_code
from vqtok.config import VQConfig


def float64_nearest(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest code of each row by float64 brute force, and which rows float32 can decide: those whose nearest
    and second-nearest codes are further apart in squared distance than eps32 (||z - c||^2 + max_k ||e_k - c||^2),
    c the codebook mean, the float32 resolution of the search's expansion. Only the others are near-ties."""
    distances = torch.cdist(z.double(), codebook.double()).pow(2)
    nearest_two = distances.topk(2, dim=1, largest=False).values
    center = codebook.double().mean(dim=0)
    resolution = torch.finfo(torch.float32).eps * (
        (z.double() - center).pow(2).sum(dim=1) + (codebook.double() - center).pow(2).sum(dim=1).max())
    return distances.argmin(dim=1), nearest_two[:, 1] - nearest_two[:, 0] > resolution


def assert_nearest(z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> None:
    """Every row that float32 can decide gets exactly its float64 nearest code. (Near-ties: none in the clustered
    cases, 1 row of the 4,096 random ones in test_bf16_expansion_would_fail_where_ours_agrees.)"""
    nearest, decidable = float64_nearest(z, codebook)
    assert decidable.float().mean() > 0.999, "the test data is mostly near-ties"
    wrong = ((codes != nearest) & decidable).sum().item()
    assert wrong == 0, f"{wrong} of {len(z)} rows got another code than the float64 nearest"


def clustered(n: int, k: int, d: int, *, scale: float, offset: float, seed: int):
    """A codebook with a common offset and data near its codes (the hard case for the expanded distance)."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g) * scale + offset
    z = codebook[torch.randint(k, (n,), generator=g)] + 0.1 * scale * torch.randn(n, d, generator=g)
    return z, codebook


CASES = [  # (K, D, scale, offset)
    (1024, 8, 1.0, 0.0),
    (1024, 8, 30.0, 100.0),  # large norms, small dimension: where bf16 expansion fails
    (512, 64, 1.0, 10.0),
    (4096, 16, 5.0, -50.0),
    (256, 256, 1.0, 0.0),
    (1024, 8, 1.0, 1000.0),  # a large common offset: without centring, float32 picks 929 of 8,192 codes wrong
]


@pytest.mark.parametrize("k, d, scale, offset", CASES)
@pytest.mark.parametrize("autocast", [False, True])
def test_nearest_code_agrees_with_float64(k, d, scale, offset, autocast):
    z, codebook = clustered(8192, k, d, scale=scale, offset=offset, seed=k + d)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        codes = nearest_code(z, codebook, chunk_elements=1 << 18)
    assert_nearest(z, codebook, codes)


def test_bf16_expansion_would_fail_where_ours_agrees():
    """The reference check is sharp: the usual ||z||^2 - 2 z.e + ||e||^2 under bf16 autocast breaks it."""
    g = torch.Generator().manual_seed(1)
    codebook, z = (torch.randn(n, 8, generator=g) * 30 + 100 for n in (1024, 4096))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = (z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)).argmin(1)
    nearest, decidable = float64_nearest(z, codebook)
    assert ((naive != nearest) & decidable).float().mean() > 0.1
    assert_nearest(z, codebook, nearest_code(z, codebook))


def test_chunk_size_does_not_change_the_codes():
    z, codebook = clustered(3000, 300, 16, scale=1.0, offset=0.0, seed=3)
    for chunk in [1 << 30, 1, 300 * 7, 300 * 1000 + 17, None]:  # one chunk, one row, 7 rows, 1000 (ragged), default
        assert_nearest(z, codebook, nearest_code(z, codebook, chunk_elements=chunk))


def test_codes_agree_across_batch_sizes_and_train_eval():
    torch.manual_seed(0)
    vq = VectorQuantizer(VQConfig(codebook_size=512, dim=8, kmeans_init=False))
    h = torch.randn(64, 8, 8, 8) * 3
    flat = h.permute(0, 2, 3, 1).reshape(-1, 8)
    full = vq.eval().encode(h)
    singles = torch.cat([vq.encode(h[i : i + 1]) for i in range(64)])
    train_codes = vq.train()(h).codes
    for codes in (full, singles, train_codes):
        assert_nearest(flat, vq.codebook, codes.flatten())


def test_bad_shapes():
    with pytest.raises(ValueError, match="expects z"):
        nearest_code(torch.zeros(4, 3), torch.zeros(5, 4))
