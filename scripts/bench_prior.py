"""Benchmarks of the transformer prior (issue: the prior). Three parts, each printing a table and ratios:

* kv-cache: `prior.generate` along its paths at 256 codes per image (a 16x16 grid), same prior, batch and seed:
  today's eager KV cache, the static cache with a compiled decode step (`compile=True`: CUDA graphs on a GPU), the
  static cache eager, and full recompute of the prefix at every step (`use_cache=False`); ratios and whether the
  codes agree. Defaults are the issue's row (a 12 x 768 prior, 64 images, top-k 100); on a CPU use tiny sizes.
* throughput: training steps (forward, backward, AdamW) of vqtok's prior against a nanoGPT-style baseline of the same
  size and parameter count - manual attention (q k^T / sqrt(d), masked_fill with a causal mask, softmax, @ v), no
  fused kernels - with the same dtype, batch, threads and data, interleaved step by step. `--compile` adds
  torch.compile to both (GPU runs).
* class-accuracy: a small CNN trained here on MNIST (train split) classifies images decoded from class-conditional
  samples of a trained prior; reports accuracy per requested class, and the classifier's accuracy on the MNIST test
  images and on the tokenizer's reconstructions of them (what decoded samples can at best reach).

    python scripts/bench_prior.py --device cuda kv-cache [--cfg-scale 2] [--dtype bf16]
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_prior.py --device cpu kv-cache --batch 8 --layers 2 --heads 4 --width 64
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_prior.py throughput
    python scripts/bench_prior.py class-accuracy --prior runs/mnist_prior/prior --mnist ../shared/datasets/mnist
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from mnist_classifier import accuracy, cached_classifier, mnist_test, predict  # scripts/, beside this file
from torch import nn

import vqtok
from vqtok.config import PriorConfig
from vqtok.models import TransformerPrior
from vqtok.models.prior import code_nll


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# KV cache


def bench_kv_cache(args: argparse.Namespace) -> dict:
    """`generate` of one batch of 16x16 grids (256 codes) along the three paths, same prior, labels and seed: today's
    eager KV cache (grows each step), the static cache with its decode step compiled (CUDA graphs on a GPU), the
    static cache eager (what compilation adds), and full recompute of the prefix at every step. Each path is first
    warmed up at the timed batch size (a prefix of all but the last few codes: the compilation and the CUDA graph
    capture happen there and are reported apart); times are medians of --repeats runs (recompute: one)."""
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    config = PriorConfig(vocab_size=args.vocab, grid=(16, 16), num_classes=10, n_layer=args.layers, n_head=args.heads,
                         n_embd=args.width)
    prior = TransformerPrior(config).to(device=device, dtype=dtype).eval()
    labels = torch.arange(args.batch) % 10
    kwargs = dict(labels=labels, top_k=args.top_k, cfg_scale=args.cfg_scale, seed=0)
    paths = {"kv_cache": dict(), "static_compiled": dict(compile=True), "static_eager": dict(cache="static"),
             "recompute": dict(use_cache=False)}
    if args.skip_recompute:
        del paths["recompute"]
    warm_prefix = torch.zeros(args.batch, config.seq_len - 4, dtype=torch.long, device=device)
    warmup_s = {}
    for name, options in paths.items():  # compiles (and captures CUDA graphs) at the timed shapes
        _sync(device)
        start = time.perf_counter()
        prior.generate(args.batch, prefix=warm_prefix, **kwargs, **options)
        _sync(device)
        warmup_s[name] = time.perf_counter() - start
    times, codes = {}, {}
    for name, options in paths.items():
        runs = []
        for _ in range(1 if name == "recompute" else args.repeats):
            _sync(device)
            start = time.perf_counter()
            codes[name] = prior.generate(args.batch, **kwargs, **options)
            _sync(device)
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
    result = {
        "codes_per_image": config.seq_len, "batch": args.batch, "layers": args.layers, "heads": args.heads,
        "width": args.width, "vocab": args.vocab, "top_k": args.top_k, "cfg_scale": args.cfg_scale,
        "dtype": args.dtype, "device": str(device), "device_name": _device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        **{f"{name}_s": t for name, t in times.items()},
        "warmup_s": warmup_s,
        "compiled_vs_kv_cache": times["kv_cache"] / times["static_compiled"],
        "static_eager_vs_kv_cache": times["kv_cache"] / times["static_eager"],
        "same_codes": {name: bool(torch.equal(codes[name], codes["kv_cache"])) for name in paths if name != "kv_cache"},
    }
    if "recompute" in times:
        result["compiled_vs_recompute"] = times["recompute"] / times["static_compiled"]
        result["speedup"] = result["kv_cache_vs_recompute"] = times["recompute"] / times["kv_cache"]
    print(f"generate {args.batch} x {config.seq_len} codes, {args.layers} layers x {args.width}, top-k {args.top_k}, "
          f"cfg {args.cfg_scale}, {args.dtype}, {result['device_name']}:")
    for name in paths:
        print(f"  {name:16s} {times[name]:9.3f} s  {args.batch * config.seq_len / times[name]:10.0f} codes/s  "
              f"(warm-up {warmup_s[name]:.1f} s)")
    print(f"  static + compiled vs today's KV cache: {result['compiled_vs_kv_cache']:.2f}x (target >= 3x at batch 64, "
          f"12 x 768, on a GPU)")
    print(f"  static eager vs today's KV cache:      {result['static_eager_vs_kv_cache']:.2f}x")
    if "recompute" in times:
        print(f"  static + compiled vs full recompute:   {result['compiled_vs_recompute']:.1f}x (target >= 20x)")
        print(f"  today's KV cache vs full recompute:    {result['kv_cache_vs_recompute']:.1f}x")
    print(f"  same codes as today's KV cache: {result['same_codes']}")
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------------------------
# Training throughput against nanoGPT-style manual attention


class ManualAttention(nn.Module):
    """nanoGPT's slow path: materialised attention matrix, masked_fill with a causal mask, softmax, matmul."""

    def __init__(self, n_embd: int, n_head: int, seq_len: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.register_buffer("mask", torch.tril(torch.ones(seq_len, seq_len)).view(1, 1, seq_len, seq_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class BaselineBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, seq_len: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = ManualAttention(n_embd, n_head, seq_len)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(approximate="tanh"), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class BaselinePrior(nn.Module):
    """The same model as vqtok's prior (learned positions, class token, pre-norm blocks), nanoGPT-style attention."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        c = config
        self.token_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.class_emb = nn.Embedding(c.num_classes + 1, c.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(c.seq_len, c.n_embd))
        self.blocks = nn.ModuleList(BaselineBlock(c.n_embd, c.n_head, c.seq_len) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.class_emb(labels)[:, None], self.token_emb(codes[:, :-1])], dim=1) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def bench_throughput(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    config = PriorConfig(vocab_size=1024, grid=(16, 16), num_classes=10, n_layer=args.layers, n_head=args.heads,
                         n_embd=args.width)
    torch.manual_seed(0)
    models = {"vqtok": TransformerPrior(config).to(device), "nanogpt_manual": BaselinePrior(config).to(device)}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    assert params["vqtok"] == params["nanogpt_manual"], params
    def data():  # the same sequence of batches for both models
        g = torch.Generator().manual_seed(0)
        while True:
            yield (torch.randint(0, 1024, (args.batch, 256), generator=g).to(device),
                   torch.randint(0, 10, (args.batch,), generator=g).to(device))

    steps = {}
    for name, model in models.items():
        model.train()
        forward = torch.compile(model) if args.compile else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        stream = data()

        def step(forward=forward, optimizer=optimizer, stream=stream):
            codes, labels = next(stream)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = code_nll(forward(codes, labels), codes)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    for step in steps.values():  # warm-up (and compilation)
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):  # interleaved, so drifts in machine speed hit both alike
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    tokens = args.batch * 256
    result = {name: {"ms_per_step": 1000 * statistics.median(t), "tokens_per_s": tokens / statistics.median(t)}
              for name, t in times.items()}
    ratios = [b / a for a, b in zip(times["vqtok"], times["nanogpt_manual"], strict=True)]
    result.update(speedup=result["vqtok"]["tokens_per_s"] / result["nanogpt_manual"]["tokens_per_s"],
                  speedup_paired=statistics.median(ratios), params=params["vqtok"], batch=args.batch,
                  dtype=args.dtype, compile=args.compile, device=str(device), threads=torch.get_num_threads(),
                  layers=args.layers, width=args.width)
    print(f"training step, batch {args.batch} x 256 codes, {args.layers} layers x {args.width} "
          f"({params['vqtok'] / 1e6:.1f} M parameters), {args.dtype}{' + compile' if args.compile else ''}, {device}:")
    for name in ("vqtok", "nanogpt_manual"):
        print(f"  {name:16s} {result[name]['ms_per_step']:8.1f} ms/step  {result[name]['tokens_per_s']:10.0f} tokens/s")
    print(f"  speed-up {result['speedup']:.2f}x (paired median {result['speedup_paired']:.2f}x)")
    return result


def bench_class_accuracy(args: argparse.Namespace) -> dict:
    mnist = Path(args.mnist)
    start = time.perf_counter()
    classifier, test_accuracy = cached_classifier(mnist, args.epochs, args.cache)
    print(f"classifier: {test_accuracy * 100:.2f}% on the MNIST test images ({time.perf_counter() - start:.0f} s)")
    prior = vqtok.load(args.prior)
    tokenizer = prior.tokenizer
    test_x, test_y = mnist_test(mnist)
    with torch.no_grad():
        recon = torch.cat([tokenizer.postprocess(tokenizer.decode(tokenizer.encode(tokenizer.preprocess(chunk))))
                           for chunk in test_x[:2000].split(500)])
    recon_accuracy = accuracy(classifier, recon, test_y[:2000])
    print(f"classifier on the tokenizer's reconstructions of 2,000 test images: {recon_accuracy * 100:.2f}%")
    results = {"classifier_test_accuracy": test_accuracy, "classifier_reconstruction_accuracy": recon_accuracy,
               "per_class": {}, "samples_per_class": args.per_class, "cfg_scale": args.cfg_scale,
               "temperature": args.temperature, "top_k": args.top_k}
    start = time.perf_counter()
    correct = 0
    for label in range(10):
        codes = prior.generate(args.per_class, labels=label, cfg_scale=args.cfg_scale, temperature=args.temperature,
                               top_k=args.top_k, seed=label)
        with torch.no_grad():
            images = tokenizer.postprocess(tokenizer.decode(codes))
        hits = int((predict(classifier, images) == label).sum())
        correct += hits
        results["per_class"][str(label)] = hits / args.per_class
        print(f"  class {label}: {hits / args.per_class * 100:6.2f}%")
    results["overall"] = correct / (10 * args.per_class)
    results["sampling_s"] = time.perf_counter() - start
    print(f"overall: {results['overall'] * 100:.2f}% of {10 * args.per_class} samples classified as requested "
          f"(cfg_scale {args.cfg_scale}, temperature {args.temperature}, top_k {args.top_k}; sampling "
          f"{results['sampling_s']:.0f} s)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    sub = parser.add_subparsers(dest="bench", required=True)
    kv = sub.add_parser("kv-cache", help="sampling: today's KV cache, static + compiled, full recompute (defaults: "
                        "the issue's row, 12 x 768, 64 images x 256 codes, top-k 100)")
    kv.add_argument("--batch", type=int, default=64)
    kv.add_argument("--layers", type=int, default=12)
    kv.add_argument("--heads", type=int, default=12)
    kv.add_argument("--width", type=int, default=768)
    kv.add_argument("--vocab", type=int, default=1024)
    kv.add_argument("--top-k", type=int, default=100)
    kv.add_argument("--cfg-scale", type=float, default=1.0, help="!= 1: guidance, both halves in the same batch")
    kv.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the prior's weights")
    kv.add_argument("--repeats", type=int, default=3)
    kv.add_argument("--skip-recompute", action="store_true", help="leave out full recompute (slow at large sizes)")
    kv.set_defaults(run=bench_kv_cache)
    tp = sub.add_parser("throughput")
    tp.add_argument("--batch", type=int, default=8)
    tp.add_argument("--layers", type=int, default=4)
    tp.add_argument("--heads", type=int, default=4)
    tp.add_argument("--width", type=int, default=256)
    tp.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    tp.add_argument("--compile", action="store_true")
    tp.add_argument("--steps", type=int, default=10)
    tp.add_argument("--warmup", type=int, default=2)
    tp.set_defaults(run=bench_throughput)
    acc = sub.add_parser("class-accuracy")
    acc.add_argument("--prior", required=True)
    acc.add_argument("--mnist", default="../shared/datasets/mnist")
    acc.add_argument("--epochs", type=int, default=2)
    acc.add_argument("--cache", default=None, help="keep the trained classifier's weights in this file and reuse them")
    acc.add_argument("--per-class", type=int, default=100)
    acc.add_argument("--cfg-scale", type=float, default=2.0)
    acc.add_argument("--temperature", type=float, default=1.0)
    acc.add_argument("--top-k", type=int, default=None)
    acc.set_defaults(run=bench_class_accuracy)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = args.run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
