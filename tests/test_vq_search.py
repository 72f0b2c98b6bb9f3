"""Nearest-code search against float64 brute force, under bf16 autocast, across batch sizes and train/eval."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqtok.bottleneck import VectorQuantizer, nearest_code, search
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


def near_ties(n: int, k: int, d: int, *, offset: float, seed: int):
    """Codes in pairs one unit apart (pairs 30 apart, all shifted by `offset`), and each vector between the two codes
    of a pair, 0.005 to 0.05 off the midpoint: squared distances to the two differ by 1% to 10%, only 3 to 30 times
    float32's resolution for these norms (and far below it without the centring, at offset 1000)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(k // 2, d, generator=g) * 30
    step = torch.nn.functional.normalize(torch.randn(k // 2, d, generator=g), dim=1)
    codebook = torch.cat([base, base + step]) + offset
    pair = torch.randint(k // 2, (n,), generator=g)
    sign = torch.randint(2, (n, 1), generator=g) * 2 - 1
    shift = 0.5 + sign * (0.005 + 0.045 * torch.rand(n, 1, generator=g))
    z = base[pair] + offset + shift * step[pair]
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
@pytest.mark.parametrize("chunk", ["chunked", "one chunk"])
def test_nearest_code_agrees_with_float64(k, d, scale, offset, autocast, chunk):
    """Both paths: many chunks (the CPU's default) and all rows in one chunk (CUDA's, when N x K fits its budget)."""
    z, codebook = clustered(8192, k, d, scale=scale, offset=offset, seed=k + d)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        codes = nearest_code(z, codebook, chunk_elements=1 << 18 if chunk == "chunked" else 8192 * k)
    assert_nearest(z, codebook, codes)


def test_the_cuda_budget_is_bounded_asked_once_and_gives_one_chunk_when_it_fits(monkeypatch):
    """min(1 GiB, a quarter of free memory) of float32 distances, from one query per device; a batch whose N x K
    distances fit is one chunk (one matmul), a larger one as few chunks as fit."""
    calls = []

    def mem_get_info(index):
        calls.append(index)
        return {0: 64 << 30, 1: 1 << 30}[index], 80 << 30

    monkeypatch.setattr(search, "_cuda_chunk_elements", {})
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    for _ in range(3):
        assert search.device_chunk_elements(torch.device("cuda", 0), 16384) == (1 << 30) // 4  # the 1 GiB bound
        assert search.device_chunk_elements(torch.device("cuda", 1), 16384) == (1 << 28) // 4  # a quarter of 1 GiB
    assert calls == [0, 1]
    assert search.device_chunk_elements(torch.device("cpu"), 16384) == search.default_chunk_elements(16384)

    mms = []
    monkeypatch.setattr(search, "device_chunk_elements", lambda device, k: 4096 * 1024)  # as CUDA's, on a CPU
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **kw: mms.append(1) or real_mm(*a, **kw))
    for n, chunks in [(4096, 1), (4097, 2), (10000, 3)]:
        mms.clear()
        z, codebook = clustered(n, 1024, 8, scale=1.0, offset=50.0, seed=n)
        assert_nearest(z, codebook, nearest_code(z, codebook))
        assert len(mms) == chunks


@pytest.mark.parametrize("chunk", [1 << 12, None])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_near_ties_agree_with_float64(chunk, offset):
    z, codebook = near_ties(4096, 512, 8, offset=offset, seed=5)
    assert_nearest(z, codebook, nearest_code(z, codebook, chunk_elements=chunk))


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="run by test_triton_kernel_under_the_interpreter, in a process with TRITON_INTERPRET=1")


def test_triton_kernel_under_the_interpreter():
    """The Triton kernel's tests (named *interpreted*) in a fresh process with TRITON_INTERPRET=1, which triton must
    see when it is imported (its own reductions are kernels too): the kernel then runs on CPU tensors via numpy."""
    triton = pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("already under the interpreter")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 3):
        # seen with triton 3.2 (torch 2.6) and numpy 2.4: its interpreter turns a loop bound given as a kernel argument
        # into a 1-element array, which numpy 2 refuses to convert to an int (a compiled kernel takes the bound as a scalar)
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run loops over a runtime bound under numpy 2")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                             "-k", "interpreted"], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    assert "skipped" not in result.stdout, result.stdout[-3000:]


TRITON_CASES = [(k, d, scale, offset) for k, d, scale, offset in CASES if d <= search.TRITON_MAX_DIM]


@interpreted
@pytest.mark.parametrize("k, d, scale, offset", TRITON_CASES)
def test_interpreted_triton_kernel_agrees_with_float64(k, d, scale, offset):
    z, codebook = clustered(1024, k, d, scale=scale, offset=offset, seed=k + d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = nearest_code(z, codebook, method="triton")
    assert_nearest(z, codebook, codes)


@interpreted
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_interpreted_triton_kernel_on_near_ties_ragged_sizes_and_duplicates(offset):
    z, codebook = near_ties(1000, 130, 5, offset=offset, seed=6)  # neither N nor K nor D a multiple of a block
    # and vectors at the codebook's mean, where every real score is > 0: the padding of the last tile must not win
    z = torch.cat([z, codebook.mean(dim=0) + 0.01 * torch.randn(30, 5, generator=torch.Generator().manual_seed(0))])
    assert_nearest(z, codebook, nearest_code(z, codebook, method="triton"))
    twice = torch.cat([codebook, codebook])  # exact ties: the first of equal codes, in any tile
    assert torch.equal(nearest_code(z, twice, method="triton"), nearest_code(z, codebook, method="triton"))


@interpreted
def test_interpreted_triton_kernel_needs_the_centring():
    """The test above is sharp: the kernel on uncentred inputs at a large offset picks wrong codes."""
    from vqtok.bottleneck.search_triton import nearest_code_triton

    z, codebook = near_ties(1000, 130, 5, offset=1000.0, seed=6)
    out = torch.empty(len(z), dtype=torch.long)
    nearest_code_triton(z, codebook, codebook.pow(2).sum(dim=1), out)
    nearest, decidable = float64_nearest(z, codebook)
    assert ((out != nearest) & decidable).float().mean() > 0.05


def test_search_method_choice():
    assert not search.uses_triton(torch.device("cpu"), 8)  # auto: never on a CPU
    assert not search.uses_triton(torch.device("cuda"), 8, "torch")
    assert not search.uses_triton(torch.device("cuda"), search.TRITON_MAX_DIM + 1)
    with pytest.raises(ValueError, match="method must be"):
        nearest_code(torch.zeros(4, 3), torch.zeros(5, 3), method="fast")
    if search._triton_search() is not None and not INTERPRETED:
        with pytest.raises(ValueError, match="runs on CUDA"):
            nearest_code(torch.zeros(4, 3), torch.zeros(5, 3), method="triton")


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k, d, scale, offset", CASES + [("ties", 8, 1.0, 1000.0)])
@pytest.mark.parametrize("method", ["torch", "auto"])
def test_nearest_code_agrees_with_float64_on_cuda(k, d, scale, offset, method):
    """The device-sized chunk and (auto, D <= TRITON_MAX_DIM, triton installed) the compiled Triton kernel on
    CUDA, under bf16 autocast and with TF32 allowed outside the search."""
    if k == "ties":
        z, codebook = near_ties(8192, 1024, d, offset=offset, seed=7)
    else:
        z, codebook = clustered(8192, k, d, scale=scale, offset=offset, seed=k + d)
    matmul = torch.backends.cuda.matmul
    old, matmul.allow_tf32 = matmul.allow_tf32, True
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            codes = nearest_code(z.cuda(), codebook.cuda(), method=method)
    finally:
        matmul.allow_tf32 = old
    assert_nearest(z, codebook, codes.cpu())


def test_bad_shapes():
    with pytest.raises(ValueError, match="expects z"):
        nearest_code(torch.zeros(4, 3), torch.zeros(5, 4))
