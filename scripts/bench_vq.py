"""Benchmark one VQ training step of vqtok's `VectorQuantizer` against `vector_quantize_pytorch.VectorQuantize`.

What is measured, per (K, D) configuration and per implementation, on N vectors (default 16384):

* A *training step*: forward, the scalar loss ``(quantized * w).sum() + aux_loss`` with a fixed random ``w``,
  backward to the input, and the EMA codebook update. vqtok applies the update in ``vq.on_optimizer_step()``
  (called after backward); the peer applies it inside its forward in training mode. Both are in ``train()`` mode,
  use an EMA codebook with the same K, D and decay, commitment weight 0.25, no k-means init, no dead-code
  restarts, and the peer's rotation trick is switched off (plain straight-through estimator, like vqtok).
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

Targets (from the issue): peer time / vqtok time >= 4; vqtok peak extra memory <= max(0.2 * N*K*4 bytes,
6 * N*D*4 bytes), i.e. a fifth of one float32 N x K matrix or six float32 N x D matrices.

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

    .venv/bin/python scripts/bench_vq.py                      # the three configurations of the issue
    .venv/bin/python scripts/bench_vq.py --configs 1024x64 --impl vqtok --steps 10 --json out.json
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


def memory_budget_bytes(n: int, k: int, d: int) -> float:
    """The issue's target: max(0.2 x one float32 N x K matrix, 6 x one float32 N x D matrix)."""
    return max(0.2 * n * k * 4, 6 * n * d * 4)


# ----------------------------------------------------------------------------------------------------------------
# float64 agreement


@torch.no_grad()
def float64_agreement(
    z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, chunk_rows: int = 1024, candidates: int = 4
) -> float:
    """Fraction of rows of z [N, D] whose chosen code is, in float64, a nearest row of codebook [K, D] to 1e-6 rel.

    Distances are taken in the direct form ||z - e||^2, which stays accurate when a vector sits on a code (the
    expansion ||z||^2 - 2 z.e + ||e||^2 would leave ~1e-14 of rounding there, far above 1e-6 of a ~1e-12 distance);
    the float64 expansion only shortlists the `candidates` nearest codes of each row for that exact evaluation.
    """
    z64, e64 = z.double(), codebook.double()
    codes = codes.reshape(-1)
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


def vqtok_initial_codebook(k: int, d: int) -> torch.Tensor:
    """The codebook vqtok starts from for (K, D); the peer is given a copy, so both start from the same one."""
    from vqtok.bottleneck import VectorQuantizer
    from vqtok.config import VQConfig

    return VectorQuantizer(VQConfig(codebook_size=k, dim=d, kmeans_init=False)).codebook.clone()


def make_vqtok(n: int, k: int, d: int) -> Runner:
    from vqtok.bottleneck import VectorQuantizer
    from vqtok.config import VQConfig

    h, w = grid_for(n)
    vq = VectorQuantizer(VQConfig(codebook_size=k, dim=d, beta=BETA, decay=DECAY, kmeans_init=False, dead_threshold=0.0))
    vq.train()
    weight = torch.randn(1, d, h, w, generator=torch.Generator().manual_seed(1))

    def prepare(z: torch.Tensor) -> torch.Tensor:  # channels-first [1, D, H, W], contiguous like an encoder output
        return z.t().reshape(1, d, h, w).contiguous().requires_grad_()

    def step(features: torch.Tensor) -> torch.Tensor:
        out = vq(features)
        ((out.z * weight).sum() + out.loss).backward()
        vq.on_optimizer_step()
        return out.codes

    return Runner("vqtok", prepare, step, lambda: vq.codebook)


def make_peer(n: int, k: int, d: int, initial_codebook: torch.Tensor) -> Runner:
    from vector_quantize_pytorch import VectorQuantize

    peer = VectorQuantize(dim=d, codebook_size=k, decay=DECAY, commitment_weight=BETA, rotation_trick=False)
    assert peer.ema_update and not peer.rotation_trick and not peer.learnable_codebook
    codebook = peer._codebook
    assert codebook.embed.shape == (1, k, d) and bool(codebook.initted)
    with torch.no_grad():  # same start as vqtok; embed_avg = embed * cluster_size (= 1), as the peer initialises it
        codebook.embed.copy_(initial_codebook[None])
        codebook.embed_avg.copy_(initial_codebook[None])
    peer.train()
    weight = torch.randn(1, d, n, generator=torch.Generator().manual_seed(1)).transpose(1, 2).contiguous()

    def prepare(z: torch.Tensor) -> torch.Tensor:  # channels-last [1, N, D]
        return z[None].clone().requires_grad_()

    def step(vectors: torch.Tensor) -> torch.Tensor:
        quantized, indices, aux_loss = peer(vectors)  # the EMA update happens in here
        ((quantized * weight).sum() + aux_loss).backward()
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


@dataclass
class Schedule:
    warmup: int  # untimed steps
    steps: int  # at least this many timed steps ...
    min_seconds: float  # ... and more, until the timed steps of all implementations took this long together
    max_steps: int  # ... but no more than this many


def time_steps(runners: list[Runner], batches: Callable[[], torch.Tensor], plan: Schedule) -> dict[str, list[float]]:
    """Milliseconds per timed step for each runner. Steps are interleaved (vqtok, peer, vqtok, ...) so that both
    implementations see the same machine conditions, and every step gets a fresh batch (the same batch over and
    over would pull codes onto single vectors, which no training run does)."""

    def one_round() -> dict[str, float]:
        z = batches()
        seconds = {}
        for runner in runners:
            inputs = runner.prepare(z)
            start = time.perf_counter()
            runner.step(inputs)
            seconds[runner.name] = time.perf_counter() - start
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


def run_config(n: int, k: int, d: int, impls: list[str], plan: Schedule, seed: int) -> list[Result]:
    """Warm-up and timed steps, then one step per implementation for peak memory and float64 agreement."""
    generator = torch.Generator().manual_seed(seed)

    def batches() -> torch.Tensor:  # standard-normal vectors [N, D]
        return torch.randn(n, d, generator=generator)

    runners = [make_vqtok(n, k, d) if impl == "vqtok" else make_peer(n, k, d, vqtok_initial_codebook(k, d))
               for impl in impls]
    times = time_steps(runners, batches, plan)

    z = batches()
    results = []
    for runner in runners:
        inputs = runner.prepare(z)  # everything that exists before the step is in the baseline:
        searched = runner.codebook().detach().clone()  # the codebook before this step's EMA update
        extra, codes = peak_extra_bytes(lambda r=runner, i=inputs: r.step(i))
        results.append(Result(
            k=k, d=d, n=n, impl=runner.name, ms_per_step=statistics.median(times[runner.name]),
            step_ms=[round(t, 2) for t in times[runner.name]], peak_extra_mib=extra / MIB,
            budget_mib=memory_budget_bytes(n, k, d) / MIB, agreement=float64_agreement(z, searched, codes),
        ))
        del inputs, searched, codes
    del runners
    _release_freed_memory()
    return results


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def environment() -> dict[str, object]:
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
        peer = by_key.get((r.k, r.d, "peer"))
        if r.impl == "vqtok" and peer:
            ratio, paired = speedups(r, peer)
            speed = f"{ratio:10.2f} {paired:8.2f}"
        else:
            speed = f"{'':>10} {'':>8}"
        print(f"{r.k:>6} {r.d:>4} {r.impl:>6} {r.ms_per_step:9.1f} {r.peak_extra_mib:9.1f} {r.budget_mib:10.1f}"
              f" {100 * r.agreement:8.3f} {speed} {r.peak_extra_mib / r.budget_mib:10.3f}")


def check_targets(results: list[Result]) -> list[str]:
    """Lines naming each target vqtok misses: speed-up >= 4 (on either ratio), peak extra memory within the
    budget, float64 agreement >= 99.9%."""
    by_key = {(r.k, r.d, r.impl): r for r in results}
    misses = []
    for r in results:
        if r.impl != "vqtok":
            continue
        peer = by_key.get((r.k, r.d, "peer"))
        if peer:
            ratio, paired = speedups(r, peer)
            if min(ratio, paired) < 4:
                misses.append(f"K={r.k} D={r.d}: speed-up {ratio:.2f}x (paired {paired:.2f}x) < 4x")
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
    parser.add_argument("--n", type=int, default=16384, help="vectors per step (default 16384 = 128 x 128)")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="KxD, e.g. 16384x256")
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

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    impls = ["vqtok", "peer"] if args.impl == "both" else [args.impl]
    env = environment()
    for key, value in env.items():
        print(f"{key}: {value}")
    print(f"N={args.n}, warmup={args.warmup}, timed steps: at least {args.steps}, more up to {args.max_steps} until "
          f"{args.min_seconds:g} s of timed steps; decay={DECAY}, beta={BETA}\n")

    results = []
    for text in args.configs:
        k, d = parse_config(text)
        plan = Schedule(args.warmup, args.steps, args.min_seconds, max(args.steps, args.max_steps))
        results += run_config(args.n, k, d, impls, plan, args.seed)
    print_table(results)
    misses = check_targets(results)
    print("\nvqtok targets: " + ("all met" if not misses else "MISSED\n  " + "\n  ".join(misses)))

    if args.json is not None:
        payload = {"environment": env, "n": args.n, "warmup": args.warmup, "min_steps": args.steps,
                   "min_seconds": args.min_seconds, "max_steps": args.max_steps,
                   "results": [asdict(r) for r in results], "missed_targets": misses}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
