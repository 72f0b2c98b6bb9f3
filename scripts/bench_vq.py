"""Benchmark one VQ training step of vqtok's `VectorQuantizer` against `vector_quantize_pytorch.VectorQuantize`.

What is measured, per (K, D) configuration and per implementation, on N vectors (default 16384):

* A *training step*: forward, the scalar loss ``(quantized * w).sum() + aux_loss`` with a fixed random ``w``,
  backward to the input, and the EMA codebook update. vqtok applies the update in ``vq.on_optimizer_step()``
  (called after backward); the peer applies it inside its forward in training mode. Both are in ``train()`` mode,
  use an EMA codebook with the same K, D and decay, commitment weight 0.25, no k-means init, no dead-code
  restarts, and the rotation trick is switched off in both (plain straight-through estimator) unless
  ``--rotation-trick`` switches it on in both (vqtok's ``VQConfig.rotation_trick``, the peer's ``rotation_trick``).
  Both start from the same codebook (vqtok's initial one, copied into the peer) and see the same input vectors:
  channels-first ``[1, D, H, W]`` with ``H * W = N`` for vqtok, channels-last ``[1, N, D]`` for the peer. The
  inputs are leaf tensors that require grad, so backward produces an ``N x D`` input gradient in both.
  Every step gets a fresh batch of standard-normal vectors, made outside the timed and measured regions.
* *Time*: median wall-clock milliseconds per step, after ``--warmup`` untimed steps (persistent accumulators are
  allocated there), over at least ``--steps`` timed steps and more (up to ``--max-steps``) until the timed steps
  took ``--min-seconds``, so that cheap configurations get enough samples. The implementations' steps are
  interleaved (vqtok, peer, vqtok, ...) so that both see the same machine conditions; the table gives the ratio
  of the medians and the median of the per-step ratios; the per-step times are in the JSON.
* *Peak extra memory*: for one further step, ``gc.collect()`` and ``malloc_trim(0)`` (so that freed heap memory
  is handed back to the OS and is not silently reused), write ``5`` to ``/proc/self/clear_refs`` (resets VmHWM to
  the current RSS), read VmRSS as the baseline, run the step, read VmHWM; extra = VmHWM - baseline.
  Everything that exists before the step (module, inputs, ``w``, the codebook copy for the agreement check) is in
  the baseline; everything allocated by the step (activations, gradients, temporaries, EMA update) is in the extra.
* *float64 agreement*: for the codes chosen in that same step, the fraction of vectors whose float64 squared
  distance to the chosen code is within 1e-6 (relative) of the float64 minimum over the codebook that the step's
  forward searched (the codebook before that step's EMA update).

Targets on a CPU (issue 1): peer time / vqtok time >= 4; vqtok peak extra memory <= max(0.2 * N*K*4 bytes,
6 * N*D*4 bytes), i.e. a fifth of one float32 N x K matrix or six float32 N x D matrices.

On CUDA (``--device cuda``; issue 16) the default rows are N = 65536 vectors with (K, D) = (1024, 64), (16384, 256),
(16384, 8), (65536, 8), and the targets are: vqtok at least as fast as the peer at every row, >= 5x at K=16384,
D=256 and >= 10x at K=65536, D=8, float64 agreement >= 99.9%. Time is measured with CUDA events around the step
(the device synchronised before it); peak extra memory is ``torch.cuda.max_memory_allocated()`` during the step
minus ``torch.cuda.memory_allocated()`` before it (live tensors, not the allocator's cache); the budget column is
then the search's distance budget (1 GiB at most) plus six float32 N x D matrices. A peer step that runs out of
device memory is reported as OOM. ``--autocast bf16`` runs both implementations' steps under bf16 autocast (the
float64 agreement shows what that does to each one's choice of codes).

Caveats:

* All configurations and both implementations run side by side in one process, as the issue asks.
* RSS counts what the allocator has mapped, not live tensor bytes. PyTorch's CPU allocator has no cache; glibc
  serves blocks above its mmap threshold by mmap and unmaps them on free, but that threshold rises (up to 32 MiB)
  each time such a block is freed, after which tensors of a few MiB come from the heap instead, where
  fragmentation can push VmHWM above the peak of live tensors (a figure reads high). ``malloc_trim(0)`` before
  the baseline keeps freed-but-mapped heap memory out of the baseline; without it the step would reuse that memory
  without raising VmHWM (a figure would read low, and vary from step to step). To see the live-tensor peak instead,
  run with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment (a fixed threshold: every block of 128 KiB or
  more is its own mapping, returned on free). Page-granular RSS makes figures below ~1 MiB noisy.
* Threads: torch's default unless ``--threads`` is given. On virtual machines whose vCPUs do not give one core
  each, OpenMP workers that spin-wait between parallel ops (libgomp's default) take cycles from the main thread,
  which slows a step made of many small ops far more than one made of a few large ones; compare ``--threads 1``
  or ``OMP_WAIT_POLICY=PASSIVE`` in the environment (it must be set before torch starts, so it is not set here).

Usage::

    .venv/bin/python scripts/bench_vq.py                      # the three CPU configurations of issue 1
    .venv/bin/python scripts/bench_vq.py --configs 1024x64 --impl vqtok --steps 10 --json out.json
    .venv/bin/python scripts/bench_vq.py --device cuda        # the four GPU rows of issue 16, N = 65536
    .venv/bin/python scripts/bench_vq.py --device cuda --autocast bf16 --min-seconds 5
    .venv/bin/python scripts/bench_vq.py --device cuda --search auto    # vqtok with the fused Triton kernel (D <= 64)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing vqtok

DEFAULT_CONFIGS = ("16384x256", "1024x64", "16384x8")
CUDA_CONFIGS = ("1024x64", "16384x256", "16384x8", "65536x8")  # issue 16's rows, at N = CUDA_N
CUDA_N = 65536
CUDA_TARGETS = {(16384, 256): 5.0, (65536, 8): 10.0}  # peer / vqtok time; 1.0 at every other row
DECAY = 0.99
BETA = 0.25
AGREEMENT_RTOL = 1e-6
MIB = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# Memory: VmRSS / VmHWM from /proc


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _release_freed_memory() -> None:
    """Collect garbage and give freed heap memory back to the OS, so the baseline RSS holds only live memory."""
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def peak_extra_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Run fn once; return (VmHWM during fn minus VmRSS just before it, in bytes; fn's result)."""
    _release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    baseline = _proc_status_kib("VmRSS")
    result = fn()
    peak = _proc_status_kib("VmHWM")
    return (peak - baseline) * 1024, result


def peak_extra_cuda_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, object]:
    """Run fn once on CUDA; return (peak allocated bytes during fn minus allocated bytes before it; fn's result)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline, result


def memory_budget_bytes(n: int, k: int, d: int, device: torch.device) -> float:
    """CPU (issue 1): max(0.2 x one float32 N x K matrix, 6 x one float32 N x D matrix). CUDA (issue 16): the
    search's distance budget (no more than one float32 N x K matrix) plus 6 float32 N x D matrices."""
    if device.type == "cuda":
        from vqtok.bottleneck.search import cuda_chunk_elements

        return 4 * min(n * k, cuda_chunk_elements(device)) + 6 * n * d * 4
    return max(0.2 * n * k * 4, 6 * n * d * 4)


# ----------------------------------------------------------------------------------------------------------------
# float64 agreement


@torch.no_grad()
def float64_agreement(
    z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, chunk_rows: int | None = None, candidates: int = 4
) -> float:
    """Fraction of rows of z [N, D] whose chosen code is, in float64, a nearest row of codebook [K, D] to 1e-6 rel.

    Distances are taken in the direct form ||z - e||^2, which stays accurate when a vector sits on a code (the
    expansion ||z||^2 - 2 z.e + ||e||^2 would leave ~1e-14 of rounding there, far above 1e-6 of a ~1e-12 distance);
    the float64 expansion only shortlists the `candidates` nearest codes of each row for that exact evaluation.
    Computed where the codebook lives (on a GPU for --device cuda), `chunk_rows` rows at a time (None: 256 MiB of
    float64 distances).
    """
    z64, e64 = z.to(codebook.device).double(), codebook.double()
    codes = codes.reshape(-1).to(codebook.device)
    chunk_rows = chunk_rows or max(1, (1 << 25) // e64.shape[0])
    chosen = (z64 - e64[codes]).pow(2).sum(dim=1)
    e_sq = e64.pow(2).sum(dim=1)
    best = torch.empty_like(chosen)
    for start in range(0, z64.shape[0], chunk_rows):
        rows = z64[start : start + chunk_rows]
        approx = torch.addmm(e_sq, rows, e64.t(), alpha=-2.0)  # ||e||^2 - 2 z.e: same order as the distances
        shortlist = approx.topk(min(candidates, e64.shape[0]), dim=1, largest=False).indices
        exact = (rows[:, None, :] - e64[shortlist]).pow(2).sum(dim=2)
        best[start : start + chunk_rows] = exact.min(dim=1).values
    agree = chosen <= best * (1 + AGREEMENT_RTOL)
    return agree.double().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# The two implementations behind one interface: a prepared training step


@dataclass
class Runner:
    """One implementation set up for one configuration. `prepare(z)` turns a batch of vectors [N, D] into this
    implementation's input (outside any measurement); `step(inputs)` runs one training step on it and returns the
    codes it chose."""

    name: str
    prepare: Callable[[torch.Tensor], torch.Tensor]
    step: Callable[[torch.Tensor], torch.Tensor]
    codebook: Callable[[], torch.Tensor]  # the codebook the next forward will search, [K, D]


def grid_for(n: int) -> tuple[int, int]:
    """(H, W) with H * W = n and H as close to sqrt(n) as possible (128 x 128 for 16384)."""
    h = math.isqrt(n)
    while n % h:
        h -= 1
    return h, n // h


def step_context(device: torch.device, autocast: str | None):
    """bf16 autocast around a step when asked for (both implementations alike), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16")


def vqtok_initial_codebook(k: int, d: int) -> torch.Tensor:
    """The codebook vqtok starts from for (K, D); the peer is given a copy, so both start from the same one."""
    from vqtok.bottleneck import VectorQuantizer
    from vqtok.config import VQConfig

    return VectorQuantizer(VQConfig(codebook_size=k, dim=d, kmeans_init=False)).codebook.clone()


SEARCH = "torch"  # VQConfig.search of the vqtok runs (--search)
ROTATION_TRICK = False  # the rotation trick in both implementations (--rotation-trick)


def make_vqtok(n: int, k: int, d: int, device: torch.device, autocast: str | None) -> Runner:
    from vqtok.bottleneck import VectorQuantizer
    from vqtok.config import VQConfig

    h, w = grid_for(n)
    vq = VectorQuantizer(VQConfig(codebook_size=k, dim=d, beta=BETA, decay=DECAY, kmeans_init=False, dead_threshold=0.0,
                                  search=SEARCH, rotation_trick=ROTATION_TRICK))
    vq.to(device).train()
    weight = torch.randn(1, d, h, w, generator=torch.Generator().manual_seed(1)).to(device)

    def prepare(z: torch.Tensor) -> torch.Tensor:  # channels-first [1, D, H, W], contiguous like an encoder output
        return z.t().reshape(1, d, h, w).to(device).contiguous().requires_grad_()

    def step(features: torch.Tensor) -> torch.Tensor:
        with step_context(device, autocast):
            out = vq(features)
            loss = (out.z * weight).sum() + out.loss
        loss.backward()
        vq.on_optimizer_step()
        return out.codes

    return Runner("vqtok", prepare, step, lambda: vq.codebook)


def make_peer(n: int, k: int, d: int, initial_codebook: torch.Tensor, device: torch.device,
              autocast: str | None) -> Runner:
    from vector_quantize_pytorch import VectorQuantize

    peer = VectorQuantize(dim=d, codebook_size=k, decay=DECAY, commitment_weight=BETA,
                         rotation_trick=ROTATION_TRICK)
    assert peer.ema_update and peer.rotation_trick == ROTATION_TRICK and not peer.learnable_codebook
    codebook = peer._codebook
    assert codebook.embed.shape == (1, k, d) and bool(codebook.initted)
    with torch.no_grad():  # same start as vqtok; embed_avg = embed * cluster_size (= 1), as the peer initialises it
        codebook.embed.copy_(initial_codebook[None])
        codebook.embed_avg.copy_(initial_codebook[None])
    peer.to(device).train()
    weight = torch.randn(1, d, n, generator=torch.Generator().manual_seed(1)).transpose(1, 2).contiguous().to(device)

    def prepare(z: torch.Tensor) -> torch.Tensor:  # channels-last [1, N, D]
        return z[None].to(device, copy=True).requires_grad_()

    def step(vectors: torch.Tensor) -> torch.Tensor:
        with step_context(device, autocast):
            quantized, indices, aux_loss = peer(vectors)  # the EMA update happens in here
            loss = (quantized * weight).sum() + aux_loss
        loss.backward()
        return indices

    return Runner("peer", prepare, step, lambda: codebook.embed[0])


# ----------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Result:
    k: int
    d: int
    n: int
    impl: str
    ms_per_step: float
    step_ms: list[float]
    peak_extra_mib: float
    budget_mib: float
    agreement: float
    device: str = "cpu"
    autocast: str = "off"
    oom: bool = False  # the implementation ran out of device memory (its figures are NaN)


@dataclass
class Schedule:
    warmup: int  # untimed steps
    steps: int  # at least this many timed steps ...
    min_seconds: float  # ... and more, until the timed steps of all implementations took this long together
    max_steps: int  # ... but no more than this many


class OutOfMemory(Exception):
    """An implementation (named by args[0]) ran out of device memory."""


def timed(step: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of step takes: wall clock on a CPU; on CUDA, CUDA events around it, the device idle before
    it and waited for after it (so the figure is the step's device time, queued work included)."""
    if device.type != "cuda":
        start = time.perf_counter()
        step()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    step()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def time_steps(runners: list[Runner], batches: Callable[[], torch.Tensor], plan: Schedule,
               device: torch.device) -> dict[str, list[float]]:
    """Milliseconds per timed step for each runner. Steps are interleaved (vqtok, peer, vqtok, ...) so that both
    implementations see the same machine conditions, and every step gets a fresh batch (the same batch over and
    over would pull codes onto single vectors, which no training run does)."""

    def one_round() -> dict[str, float]:
        z = batches()
        seconds = {}
        for runner in runners:
            inputs = runner.prepare(z)
            try:
                seconds[runner.name] = timed(lambda r=runner, i=inputs: r.step(i), device)
            except torch.cuda.OutOfMemoryError as error:
                raise OutOfMemory(runner.name) from error
        return seconds

    for _ in range(plan.warmup):
        one_round()
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    elapsed, done = 0.0, 0
    while done < plan.steps or (elapsed < plan.min_seconds and done < plan.max_steps):
        for name, seconds in one_round().items():
            times[name].append(seconds * 1e3)
            elapsed += seconds
        done += 1
    return times


def run_config(n: int, k: int, d: int, impls: list[str], plan: Schedule, seed: int, device: torch.device,
               autocast: str | None) -> list[Result]:
    """Warm-up and timed steps, then one step per implementation for peak memory and float64 agreement. On CUDA an
    implementation that runs out of memory is dropped from this configuration and reported as OOM."""
    generator = torch.Generator().manual_seed(seed)

    def batches() -> torch.Tensor:  # standard-normal vectors [N, D], made on the host (copied in `prepare`)
        return torch.randn(n, d, generator=generator)

    def make(impl: str) -> Runner:
        if impl == "vqtok":
            return make_vqtok(n, k, d, device, autocast)
        return make_peer(n, k, d, vqtok_initial_codebook(k, d), device, autocast)

    common = dict(k=k, d=d, n=n, budget_mib=memory_budget_bytes(n, k, d, device) / MIB, device=device.type,
                  autocast=autocast or "off")
    runners, out_of_memory = [make(impl) for impl in impls], []
    while True:
        try:
            times = time_steps(runners, batches, plan, device)
            break
        except OutOfMemory as error:
            print(f"K={k} D={d}: {error.args[0]} ran out of device memory; dropped from this configuration")
            out_of_memory.append(error.args[0])
            runners = [r for r in runners if r.name != error.args[0]]
            _release_freed_memory()
            torch.cuda.empty_cache()
            if not runners:
                times = {}
                break

    z = batches()
    results = []
    for runner in runners:
        inputs = runner.prepare(z)  # everything that exists before the step is in the baseline:
        searched = runner.codebook().detach().clone()  # the codebook before this step's EMA update
        step = lambda r=runner, i=inputs: r.step(i)  # noqa: E731
        extra, codes = peak_extra_cuda_bytes(step, device) if device.type == "cuda" else peak_extra_bytes(step)
        results.append(Result(
            impl=runner.name, ms_per_step=statistics.median(times[runner.name]),
            step_ms=[round(t, 3) for t in times[runner.name]], peak_extra_mib=extra / MIB,
            agreement=float64_agreement(z, searched, codes), **common,
        ))
        del inputs, searched, codes
    nan = float("nan")
    results += [Result(impl=name, ms_per_step=nan, step_ms=[], peak_extra_mib=nan, agreement=nan, oom=True, **common)
                for name in out_of_memory]
    del runners
    _release_freed_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def environment(device: torch.device) -> dict[str, object]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vector_quantize_pytorch": version("vector-quantize-pytorch"),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "unset (glibc dynamic threshold)"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def speedups(vqtok: Result, peer: Result) -> tuple[float, float]:
    """(ratio of the median step times, median of the per-step ratios of interleaved steps), peer over vqtok. The
    second is robust to the machine's speed drifting during the run, as it does on shared virtual machines."""
    paired = [p / v for p, v in zip(peer.step_ms, vqtok.step_ms)]
    return peer.ms_per_step / vqtok.ms_per_step, statistics.median(paired)


def print_table(results: list[Result]) -> None:
    by_key = {(r.k, r.d, r.impl): r for r in results}
    header = (f"{'K':>6} {'D':>4} {'impl':>6} {'ms/step':>9} {'peak MiB':>9} {'budget MiB':>10} {'agree %':>8}"
              f" {'peer/vqtok':>10} {'(paired)':>8} {'mem/budget':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        if r.oom:
            print(f"{r.k:>6} {r.d:>4} {r.impl:>6} {'OOM':>9}")
            continue
        peer = by_key.get((r.k, r.d, "peer"))
        if r.impl == "vqtok" and peer and not peer.oom:
            ratio, paired = speedups(r, peer)
            speed = f"{ratio:10.2f} {paired:8.2f}"
        else:
            speed = f"{'':>10} {'':>8}"
        print(f"{r.k:>6} {r.d:>4} {r.impl:>6} {r.ms_per_step:9.1f} {r.peak_extra_mib:9.1f} {r.budget_mib:10.1f}"
              f" {100 * r.agreement:8.3f} {speed} {r.peak_extra_mib / r.budget_mib:10.3f}")


def speed_target(r: Result) -> float:
    """Peer time / vqtok time to reach: 4 on a CPU (issue 1); on CUDA 1, 5 or 10 by row (issue 16)."""
    return CUDA_TARGETS.get((r.k, r.d), 1.0) if r.device == "cuda" else 4.0


def check_targets(results: list[Result]) -> list[str]:
    """Lines naming each target vqtok misses: the speed-up (`speed_target`, on either ratio; a peer out of memory
    counts as met), peak extra memory within the budget, float64 agreement >= 99.9%."""
    by_key = {(r.k, r.d, r.impl): r for r in results}
    misses = []
    for r in results:
        if r.impl != "vqtok":
            continue
        if r.oom:
            misses.append(f"K={r.k} D={r.d}: vqtok ran out of device memory")
            continue
        peer = by_key.get((r.k, r.d, "peer"))
        if peer and not peer.oom:
            ratio, paired = speedups(r, peer)
            target = speed_target(r)
            if min(ratio, paired) < target:
                misses.append(f"K={r.k} D={r.d}: speed-up {ratio:.2f}x (paired {paired:.2f}x) < {target:g}x")
        if r.peak_extra_mib > r.budget_mib:
            misses.append(f"K={r.k} D={r.d}: peak extra {r.peak_extra_mib:.1f} MiB > budget {r.budget_mib:.1f} MiB")
        if r.agreement < 0.999:
            misses.append(f"K={r.k} D={r.d}: float64 agreement {100 * r.agreement:.3f}% < 99.9%")
    return misses


# ----------------------------------------------------------------------------------------------------------------


def parse_config(text: str) -> tuple[int, int]:
    k, _, d = text.lower().partition("x")
    return int(k), int(d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None,
                        help=f"vectors per step (default 16384 = 128 x 128 on a CPU, {CUDA_N} on CUDA)")
    parser.add_argument("--configs", nargs="+", default=None,
                        help=f"KxD, e.g. 16384x256 (default {' '.join(DEFAULT_CONFIGS)} on a CPU, "
                             f"{' '.join(CUDA_CONFIGS)} on CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:1, ...)")
    parser.add_argument("--autocast", choices=["off", "bf16"], default="off",
                        help="run both implementations' steps under bf16 autocast")
    parser.add_argument("--search", choices=["torch", "auto"], default="torch",
                        help="vqtok's VQConfig.search: torch (the matmul search, the default), or auto (the fused "
                             "Triton kernel on CUDA where D <= 64 and triton is installed, else torch)")
    parser.add_argument("--rotation-trick", action="store_true",
                        help="the rotation trick (Fifty et al. 2024) instead of the straight-through gradient, in both")
    parser.add_argument("--steps", type=int, default=5, help="minimum timed steps per configuration (median reported)")
    parser.add_argument("--min-seconds", type=float, default=20.0,
                        help="keep timing past --steps until the timed steps took this long (cheap configurations)")
    parser.add_argument("--max-steps", type=int, default=100, help="upper limit on timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--impl", choices=["both", "vqtok", "peer"], default="both")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    n = args.n or (CUDA_N if device.type == "cuda" else 16384)
    configs = args.configs or list(CUDA_CONFIGS if device.type == "cuda" else DEFAULT_CONFIGS)
    autocast = None if args.autocast == "off" else args.autocast
    global SEARCH, ROTATION_TRICK
    SEARCH, ROTATION_TRICK = args.search, args.rotation_trick
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    impls = ["vqtok", "peer"] if args.impl == "both" else [args.impl]
    env = environment(device)
    for key, value in env.items():
        print(f"{key}: {value}")
    print(f"N={n}, device={device}, autocast={args.autocast}, search={args.search}, rotation_trick={args.rotation_trick}, warmup={args.warmup}, timed steps: at least "
          f"{args.steps}, more up to {args.max_steps} until {args.min_seconds:g} s of timed steps; decay={DECAY}, "
          f"beta={BETA}\n")

    results = []
    for text in configs:
        k, d = parse_config(text)
        plan = Schedule(args.warmup, args.steps, args.min_seconds, max(args.steps, args.max_steps))
        results += run_config(n, k, d, impls, plan, args.seed, device, autocast)
    print_table(results)
    misses = check_targets(results)
    print("\nvqtok targets: " + ("all met" if not misses else "MISSED\n  " + "\n  ".join(misses)))

    if args.json is not None:
        payload = {"environment": env, "n": n, "device": str(device), "autocast": args.autocast, "search": args.search,
                   "rotation_trick": args.rotation_trick, "warmup": args.warmup, "min_steps": args.steps,
                   "min_seconds": args.min_seconds, "max_steps": args.max_steps,
                   "results": [asdict(r) for r in results], "missed_targets": misses}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
