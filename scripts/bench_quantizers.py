"""Train the same CIFAR-10 tokenizer with several discrete bottlenecks at about 10 bits per position and compare
test PSNR, SSIM, code usage, perplexity and time per step, side by side.

The quantizers (`--quantizers`, any subset, in this order):

    vq           vqtok's VQ, K = 1,024, D = 64 (library defaults: EMA 0.99, k-means init, restarts, beta 0.25)
    vq_rotation  the same with the rotation trick (Fifty et al. 2024) instead of the straight-through gradient
    fsq          vqtok's FSQ, levels [8, 5, 5, 5] (1,000 codes)
    peer_fsq     vector-quantize-pytorch's FSQ(levels=[8, 5, 5, 5]) dropped into the same model
    lfq          vqtok's LFQ, 10 bits (1,024 codes), library defaults
    peer_lfq     vector-quantize-pytorch's LFQ(dim=10) with its defaults dropped into the same model
    rvq          vqtok's residual VQ, 2 levels of K = 32, D = 64 (2 x 5 = 10 bits)

Every model shares everything but the bottleneck: the encoder and decoder start from the same weights (those of the
`vq` model, built first; each other model is built with its own bottleneck and 1x1 projections, then given these
weights), all see the same batches and flips, the same AdamW (warm-up + cosine), clipping and loss (MSE + the
bottleneck's own loss): `bench_vq_training.py`'s `batches` and `train_step`. The models' steps alternate (one step
each in turn), so they see the same machine conditions; time per step is the median over steps, data excluded.
CPU budget: the models of one invocation share the cores; `--threads` sets torch's.

Evaluation after training, on the CIFAR-10 test split: `vqtok.train.evaluate.evaluate` (PSNR/SSIM on 8-bit images,
usage = fraction of the codes the test images use, perplexity of those codes; for RVQ over every level's codes
together, the perplexity the mean of the levels', plus each level's).

The runs can be split over invocations (`--json` each) and joined into one table with `--table A.json B.json ...`
(time per step is then best compared within one invocation: `--timing-only` runs every quantizer for a few steps,
interleaved, without evaluation, and its JSON's times replace the others' in the table).

Usage (the JPEG folders of ../shared/datasets/cifar10; see configs/cifar10_vq.yaml)::

    mkdir -p data && tar -xf ../shared/datasets/cifar10/cifar10-jpeg.tar -C data
    python scripts/bench_quantizers.py --quantizers vq,vq_rotation,fsq,peer_fsq --steps 1000 --json a.json
    python scripts/bench_quantizers.py --quantizers lfq,peer_lfq,rvq --steps 1000 --json b.json
    python scripts/bench_quantizers.py --timing-only --steps 60 --json timing.json
    python scripts/bench_quantizers.py --table a.json b.json timing.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vq_training import (  # noqa: E402 (the VQ comparison's loop and options)
    add_training_arguments,
    batches,
    optimizers_for,
    train_step,
)

from vqtok.bottleneck import Bottleneck, BottleneckOutput  # noqa: E402
from vqtok.config import AutoencoderConfig, DataConfig, VQConfig  # noqa: E402
from vqtok.data import build_dataset  # noqa: E402
from vqtok.images import uint8_to_range  # noqa: E402
from vqtok.models import Autoencoder  # noqa: E402
from vqtok.train.evaluate import evaluate  # noqa: E402

QUANTIZERS = ("vq", "vq_rotation", "fsq", "peer_fsq", "lfq", "peer_lfq", "rvq")
FSQ_LEVELS = (8, 5, 5, 5)
LFQ_BITS = 10


class PeerQuantizer(Bottleneck):
    """A vector-quantize-pytorch quantizer (FSQ or LFQ) behind vqtok's bottleneck interface, so that the same
    Autoencoder and the same `evaluate` serve it. Features [B, dim, h, w] go in channel-first, as the peer takes
    image feature maps; its codebook is its implicit grid (`implicit_codebook` / `codebook`)."""

    def __init__(self, quantizer: torch.nn.Module, dim: int, vocab_size: int, codebook: torch.Tensor):
        super().__init__()
        self.quantizer = quantizer
        self.dim = self.in_channels = dim
        self.vocab_size = vocab_size
        self.register_buffer("_codebook", codebook.float(), persistent=False)

    def forward(self, h: torch.Tensor) -> BottleneckOutput:
        out = self.quantizer(h)
        quantized, codes = out[0], out[1]
        loss = out[2].sum() if len(out) > 2 else torch.zeros((), device=h.device)
        return BottleneckOutput(z=quantized, loss=loss, terms={"aux": loss.detach()}, codes=codes)

    @torch.no_grad()
    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.quantizer(h)[1]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self._codebook[codes].permute(0, 3, 1, 2)


def peer_fsq() -> PeerQuantizer:
    from vector_quantize_pytorch import FSQ

    fsq = FSQ(levels=list(FSQ_LEVELS))
    return PeerQuantizer(fsq, len(FSQ_LEVELS), fsq.codebook_size, fsq.implicit_codebook)


def peer_lfq() -> PeerQuantizer:
    from vector_quantize_pytorch import LFQ

    lfq = LFQ(dim=LFQ_BITS)  # its defaults: entropy weight 0.1, no commitment loss, diversity gamma 1
    return PeerQuantizer(lfq, LFQ_BITS, lfq.codebook_size, lfq.codebook)


def bottleneck_config(name: str):
    """vqtok's bottleneck config for one of QUANTIZERS (None for the peers, which replace the bottleneck)."""
    if name == "vq":
        return VQConfig(codebook_size=1024, dim=64)
    if name == "vq_rotation":
        return VQConfig(codebook_size=1024, dim=64, rotation_trick=True)
    if name == "fsq":
        from vqtok.bottleneck.fsq import FSQConfig
        return FSQConfig(levels=FSQ_LEVELS)
    if name == "lfq":
        from vqtok.bottleneck.lfq import LFQConfig
        return LFQConfig(bits=LFQ_BITS)
    if name == "rvq":
        from vqtok.bottleneck.rvq import RVQConfig
        return RVQConfig(depth=2, codebook_size=32, dim=64)
    return None


def build_models(names: list[str], args: argparse.Namespace) -> dict[str, Autoencoder]:
    """One model per quantizer, all with the `vq` model's encoder and decoder weights."""
    base = AutoencoderConfig(
        in_channels=3, resolution=32, base_channels=args.base_channels, channel_mult=(1, 2, 2),
        num_res_blocks=args.res_blocks, attn_resolutions=(), latent_channels=64, norm_groups=32,
        bottleneck=VQConfig(codebook_size=1024, dim=64))
    torch.manual_seed(args.seed)
    reference = Autoencoder(base)
    shared = {k: v for k, v in reference.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    models = {}
    for name in names:
        torch.manual_seed(args.seed + 1)
        config = bottleneck_config(name)
        if config is None:  # a peer: the quantizer's width, then the peer's module in place of vqtok's
            width = len(FSQ_LEVELS) if name == "peer_fsq" else LFQ_BITS
            from vqtok.bottleneck.fsq import FSQConfig
            model = Autoencoder(replace(base, bottleneck=FSQConfig(levels=(3,) * width)))
            model.bottleneck = peer_fsq() if name == "peer_fsq" else peer_lfq()
        else:
            model = Autoencoder(replace(base, bottleneck=config))
        missing, unexpected = model.load_state_dict(shared, strict=False)
        assert not unexpected and not any(k.startswith(("encoder.", "decoder.")) for k in missing), (missing, unexpected)
        models[name] = model
    return models


def train(models: dict[str, Autoencoder], args: argparse.Namespace, device: torch.device, train_set) -> dict:
    optimizers = optimizers_for(models, args, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, list[float]] = {name: [] for name in models}
    value_range = next(iter(models.values())).config.value_range
    started = time.perf_counter()
    for step, images in enumerate(batches(train_set, steps=args.steps, batch_size=args.batch_size, seed=args.seed)):
        x = uint8_to_range(images.to(device), value_range)
        for name, model in models.items():
            seconds, loss = train_step(model, *optimizers[name], x, clip=1.0)
            times[name].append(seconds)
            losses[name].append(loss)
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            recent = "  ".join(f"{n} {statistics.mean(v[-50:]):.4f}" for n, v in losses.items())
            print(f"step {step + 1}/{args.steps}  loss {recent}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return {name: {"ms_per_step": 1000 * statistics.median(times[name][args.skip_first:] or times[name]),
                   "final_train_loss": statistics.mean(losses[name][-50:])} for name in models}


@torch.no_grad()
def joint_perplexity(model: Autoencoder, test_set, limit: int, device: torch.device) -> float:
    """A residual VQ's perplexity of the tuple of codes at a position (c_0 + K c_1 + ...: K^depth values), the
    figure comparable with a single codebook's perplexity at equal bits (evaluate's is the mean of the levels')."""
    from vqtok.metrics import perplexity

    k, depth = model.vocab_size, model.bottleneck.code_depth
    counts = torch.zeros(k**depth, dtype=torch.float64)
    subset = torch.utils.data.Subset(test_set, range(min(limit, len(test_set))))
    for images, _ in torch.utils.data.DataLoader(subset, batch_size=250):
        codes = model.encode(uint8_to_range(images.to(device), model.config.value_range)).cpu()
        joint = (codes * (k ** torch.arange(depth))).sum(-1)
        counts += torch.bincount(joint.flatten(), minlength=k**depth).double()
    return float(perplexity(counts))


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    names = list(QUANTIZERS) if args.timing_only else args.quantizers.split(",")
    unknown = [n for n in names if n not in QUANTIZERS]
    if unknown:
        raise SystemExit(f"unknown quantizers {unknown}; choose from {', '.join(QUANTIZERS)}")
    models = build_models(names, args)
    params = sum(p.numel() for n, p in models[names[0]].named_parameters() if n.startswith(("encoder.", "decoder.")))
    print(f"encoder + decoder: {params / 1e6:.2f} M parameters, shared initial weights; {args.steps} steps at batch "
          f"{args.batch_size} on {device}, {torch.get_num_threads()} threads: {', '.join(names)}")
    config = next(iter(models.values())).config
    train_set = build_dataset(DataConfig(source="folder", path=args.train), channels=3, preprocess=config.preprocess,
                              size=32)
    results = {"steps": args.steps, "batch_size": args.batch_size, "device": str(device), "params": params,
               "threads": torch.get_num_threads(), "timing_only": args.timing_only, "torch": torch.__version__,
               "vector_quantize_pytorch": version("vector-quantize-pytorch"), "quantizers": {}}
    started = time.perf_counter()
    results["quantizers"] = train(models, args, device, train_set)
    results["train_seconds"] = time.perf_counter() - started
    if args.timing_only:
        return results
    test_set = build_dataset(DataConfig(source="folder", path=args.test), channels=3, preprocess=config.preprocess,
                             size=32)
    for name, model in models.items():
        metrics = evaluate(model, test_set, limit=args.eval_images, batch_size=250)
        if model.bottleneck.code_depth:
            metrics["joint_code_perplexity"] = joint_perplexity(model, test_set, args.eval_images, device)
        metrics["code_depth"] = model.bottleneck.code_depth or 1
        results["quantizers"][name].update(metrics, vocab_size=model.vocab_size)
        assert math.isfinite(metrics["psnr"]), name
    return results


def table(results: list[dict]) -> str:
    """One markdown table of every quantizer in `results` (times from a timing-only result when there is one)."""
    rows: dict[str, dict] = {}
    timing: dict[str, float] = {}
    for r in results:
        for name, m in r["quantizers"].items():
            if r["timing_only"]:
                timing[name] = m["ms_per_step"]
            else:
                rows[name] = m
    lines = ["| quantizer | codes per position | test PSNR | SSIM | usage | perplexity | ms/step |",
             "|---|---|---|---|---|---|---|"]
    for name in QUANTIZERS:
        if name not in rows:
            continue
        m = rows[name]
        ms = timing.get(name, m["ms_per_step"])
        depth = m.get("code_depth", 1)
        codes = f"{m['vocab_size']:,}" if depth == 1 else f"{m['vocab_size'] ** depth:,} ({m['vocab_size']}^{depth})"
        joint = m.get("joint_code_perplexity")
        shown = f"{m['code_perplexity']:.1f}" if joint is None else f"{joint:.1f} (joint)"
        lines.append(f"| {name} | {codes} | {m['psnr']:.2f} dB | {m['ssim']:.3f} | "
                     f"{100 * m['code_usage']:.1f}% | {shown} | {ms:.0f} |")
        for key in sorted(k for k in m if k.startswith("code_usage/level_")):  # a residual VQ's levels
            level = key.rsplit("_", 1)[1]
            lines.append(f"| {name} level {level} | {m['vocab_size']:,} | | | {100 * m[key]:.1f}% | "
                         f"{m[f'code_perplexity/level_{level}']:.1f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantizers", default=",".join(QUANTIZERS), help=f"comma-separated: {', '.join(QUANTIZERS)}")
    add_training_arguments(parser)
    parser.add_argument("--skip-first", type=int, default=5, help="steps left out of the time median (warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--timing-only", action="store_true", help="every quantizer, no evaluation: times only")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the table of earlier runs' JSON files")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(Path(p).read_text()) for p in args.table]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.timing_only:
        print(table([results]))
    else:
        print("\n".join(f"{n}: {m['ms_per_step']:.1f} ms per step" for n, m in results["quantizers"].items()))


if __name__ == "__main__":
    main()
