"""Nearest-code search against float64 brute force, under bf16 autocast, across batch sizes and train/eval."""

import pytest
import torch

from vqtok.bottleneck import VectorQuantizer, nearest_code
from vqtok.config import VQConfig


def agreement(z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per vector: is the float64 distance of the chosen code within 1e-6 (relative) of the float64 minimum?"""
    d = torch.cdist(z.double(), codebook.double()).pow(2)
    best = d.min(dim=1).values
    chosen = d.gather(1, codes[:, None]).squeeze(1)
    return chosen <= best * (1 + 1e-6) + 1e-12


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
]


@pytest.mark.parametrize("k, d, scale, offset", CASES)
@pytest.mark.parametrize("autocast", [False, True])
def test_nearest_code_agrees_with_float64(k, d, scale, offset, autocast):
    z, codebook = clustered(8192, k, d, scale=scale, offset=offset, seed=k + d)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        codes = nearest_code(z, codebook, chunk_elements=1 << 18)
    assert agreement(z, codebook, codes).float().mean() >= 0.999


def test_bf16_expansion_would_fail_where_ours_agrees():
    """The reference check is sharp: the usual ||z||^2 - 2 z.e + ||e||^2 under bf16 autocast breaks it."""
    g = torch.Generator().manual_seed(1)
    codebook, z = (torch.randn(n, 8, generator=g) * 30 + 100 for n in (1024, 4096))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = (z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)).argmin(1)
    assert agreement(z, codebook, naive).float().mean() < 0.9
    assert agreement(z, codebook, nearest_code(z, codebook)).float().mean() >= 0.999


def test_chunk_size_does_not_change_the_codes():
    z, codebook = clustered(3000, 300, 16, scale=1.0, offset=0.0, seed=3)
    reference = nearest_code(z, codebook, chunk_elements=1 << 30)  # one chunk
    for chunk in [1, 300 * 7, 300 * 1000 + 17, None]:  # one row, 7 rows, 1000 rows (ragged end), the default
        codes = nearest_code(z, codebook, chunk_elements=chunk)
        differ = codes != reference
        assert differ.float().mean() <= 1e-3
        assert agreement(z[differ], codebook, codes[differ]).all()  # any difference is a near-tie


def test_codes_agree_across_batch_sizes_and_train_eval():
    torch.manual_seed(0)
    vq = VectorQuantizer(VQConfig(codebook_size=512, dim=8, kmeans_init=False))
    h = torch.randn(64, 8, 8, 8) * 3
    full = vq.eval().encode(h)
    singles = torch.cat([vq.encode(h[i : i + 1]) for i in range(64)])
    train_codes = vq.train()(h).codes
    flat = h.permute(0, 2, 3, 1).reshape(-1, 8)
    for other in (singles, train_codes):
        differ = (other != full).flatten()
        assert differ.float().mean() <= 1e-3
        # any disagreement must be a near-tie: both choices within 1e-6 of the float64 minimum
        assert agreement(flat[differ], vq.codebook, other.flatten()[differ]).all()
        assert agreement(flat[differ], vq.codebook, full.flatten()[differ]).all()


def test_bad_shapes():
    with pytest.raises(ValueError, match="expects z"):
        nearest_code(torch.zeros(4, 3), torch.zeros(5, 4))
