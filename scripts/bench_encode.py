"""Encoding throughput: the VQGAN-f16 layout against diffusers' VQModel (default), or `vqtok encode` end to end.

Model rows (the default): a VQModel shaped like taming's ImageNet f16 VQGAN (ch 128, ch_mult 1, 1, 2, 2, 4, two
res blocks per level, attention at 16x16 and in the mid block, z 256, `--codes` codes of dim 256; random weights,
codebook drawn at the features' scale: scripts/bench_pretrained.py builds it), saved and loaded by `vqtok.load` - the
same layers and weights in both libraries. On `--device`, in inference mode, images/s of:

    encode  vqtok eager            tok.encode(x)                                       -> codes [B, h, w]
            vqtok compiled         the same, as `vqtok encode --compile` runs it: encoder and quant_conv compiled in
                                   place (nn.Module.compile), channels_last weights and input on CUDA
            vqtok compiled bf16    the same under bfloat16 autocast (`vqtok encode --compile --precision bf16`)
            diffusers eager        vq.quantize(vq.encode(x).latents) -> indices
    decode  vqtok eager            tok.decode(codes)
            vqtok compiled (bf16)  post_quant_conv and decoder compiled in place, channels_last on CUDA (bf16 autocast)
            diffusers eager        vq.decode(get_codebook_entry(codes), force_not_quantize=True).sample

Agreement is checked first (the script stops unless eager vqtok's codes equal diffusers' and its decode is within
`--tolerance` of theirs); the compiled and bf16 codes' agreement with eager is reported. Timing: `--warmup` calls of
each (the compiled ones compile then), then `--reps` rounds calling every variant once, in a rotating order; CUDA is
synchronised around each call. Figures are medians; ratios are against diffusers eager (the issue's target: >= 2x at
256x256, batch 32) and against vqtok eager, measured in the same process.

    python scripts/bench_encode.py --device cuda --size 256 --batch 32 --json encode_gpu.json
    python scripts/bench_encode.py --device cpu --size 64 --batch 2 --warmup 1 --reps 2     # does it work

End to end (`--images`): `vqtok.encode_dataset` from the extracted CIFAR-10 JPEG image folder (listing, decoding in
DataLoader workers, batching, encoding, writing shards and checksums, the manifest) against the bare encoder +
quantizer on uint8 batches already in memory, with configs/cifar10_vq.yaml's model (random weights); `--compile`
and `--precision` are passed to both.

    tar -xf ../shared/datasets/cifar10/cifar10-jpeg.tar -C /tmp/cifar
    python scripts/bench_encode.py --images /tmp/cifar/train --limit 10240
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import vqtok
from vqtok.config import AutoencoderConfig, DataConfig, TrainConfig, load_yaml
from vqtok.data import encode_dataset
from vqtok.data.token_store import _encoder_prepared, encode_autocast
from vqtok.images import uint8_to_range

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrained import cpu_name, diffusers_model, spread_codebook  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Model rows: the VQGAN-f16 layout, vqtok eager / compiled / compiled bf16 against diffusers eager


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def decoder_prepared(tok: vqtok.Autoencoder, *, channels_last: bool) -> Any:
    """The decode path compiled in place (post_quant_conv, decoder), channels_last on CUDA: as `_encoder_prepared`
    does for the encode path."""
    modules = [tok.post_quant_conv, tok.decoder]
    for module in modules:
        if channels_last:
            module.to(memory_format=torch.channels_last)
        module.compile()
    try:
        yield
    finally:
        for module in modules:
            module._compiled_call_impl = None
            module.to(memory_format=torch.contiguous_format)


def time_rounds(variants: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int,
                reps: int) -> dict[str, list[float]]:
    """Seconds per call of each variant: `warmup` calls each, then `reps` rounds of one call each, the order rotated
    every round so that the machine's drift hits all of them."""
    names = list(variants)
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                variants[name]()
            sync(device)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(reps):
            for name in names[r % len(names):] + names[: r % len(names)]:
                sync(device)
                start = time.perf_counter()
                variants[name]()
                sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def model_rows(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    x = (torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    ref = diffusers_model("vqgan-f16", small=args.small, vqgan_codes=args.codes, resolution=256).eval().to(device)
    spread_codebook(ref, x, unit=False)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        tok = vqtok.load(tmp).eval().to(device)
    params = sum(p.numel() for p in tok.parameters())
    print(f"vqtok {vqtok.__version__}, torch {torch.__version__}, {device_name(device)}; VQGAN-f16 layout "
          f"({params / 1e6:.1f} M parameters, {args.codes} codes{', widths halved' if args.small else ''}), "
          f"{args.size}x{args.size}, batch {args.batch}", flush=True)

    def ref_encode() -> torch.Tensor:
        _, _, (_, _, codes) = ref.quantize(ref.encode(x).latents)
        return codes.view(args.batch, args.size // 16, args.size // 16)

    def ref_decode() -> torch.Tensor:
        shape = (args.batch, args.size // 16, args.size // 16, ref.quantize.vq_embed_dim)
        return ref.decode(ref.quantize.get_codebook_entry(codes.flatten(), shape), force_not_quantize=True).sample

    def tok_encode(precision: str = "float32") -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with encode_autocast(device, precision):
                return tok.encode(x.contiguous(memory_format=torch.channels_last) if cuda else x)
        return run

    def tok_decode(precision: str = "float32") -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with encode_autocast(device, precision):
                return tok.decode(codes)
        return run

    with torch.inference_mode():
        codes = tok.encode(x)
        agreement = {"codes_equal_diffusers": (codes == ref_encode()).double().mean().item(),
                     "codes_distinct": int(codes.unique().numel())}
        decoded = ref_decode()
        agreement["decode_max_abs_err"] = (tok.decode(codes) - decoded).abs().max().item()
    if agreement["codes_equal_diffusers"] < 1 or agreement["decode_max_abs_err"] > args.tolerance * max(
            decoded.abs().max().item(), 1.0):
        raise SystemExit(f"vqtok and diffusers disagree ({agreement}); not timing different models")

    results: dict[str, Any] = {"agreement": agreement, "rows": []}
    for op, eager, ref_fn in (("encode", tok_encode, ref_encode), ("decode", tok_decode, ref_decode)):
        context = (_encoder_prepared(tok, compile=True, channels_last=cuda) if op == "encode"
                   else decoder_prepared(tok, channels_last=cuda))
        outputs = {}
        with torch.inference_mode():
            outputs["vqtok eager"] = eager()()
        variants: dict[str, Callable[[], Any]] = {"vqtok eager": eager(), "diffusers eager": ref_fn}
        with context:
            compiled = {"vqtok compiled": eager(), "vqtok compiled bf16": eager("bf16")}
            variants.update(compiled)
            times = time_rounds(variants, device, warmup=args.warmup, reps=args.reps)
            with torch.inference_mode():
                outputs.update({name: fn() for name, fn in compiled.items()})
        for name in compiled:
            ours, eager_out = outputs[name], outputs["vqtok eager"]
            agreement[f"{op}: {name} vs eager"] = ((ours == eager_out).double().mean().item() if op == "encode"
                                                   else (ours.float() - eager_out).abs().max().item())
        median = {name: statistics.median(t) for name, t in times.items()}
        for name in variants:
            results["rows"].append({
                "op": op, "variant": name, "img_per_s": args.batch / median[name],
                "vs_diffusers": median["diffusers eager"] / median[name],
                "vs_vqtok_eager": median["vqtok eager"] / median[name], "seconds": times[name]})
    print("\n| op | variant | img/s | vs diffusers eager | vs vqtok eager |\n|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['op']} | {r['variant']} | {r['img_per_s']:.2f} | {r['vs_diffusers']:.2f}x | "
              f"{r['vs_vqtok_eager']:.2f}x |")
    print(f"\nagreement: {json.dumps({k: float(f'{v:.4g}') for k, v in agreement.items()})}")
    return {"vqtok": vqtok.__version__, "torch": torch.__version__, "device": device_name(device),
            "threads": torch.get_num_threads(), "size": args.size, "batch": args.batch, "codes": args.codes,
            "small": args.small, "parameters": params, "warmup": args.warmup, "reps": args.reps, **results}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()} ({torch.get_num_threads()} "\
        "threads)"


# ----------------------------------------------------------------------------------------------------------------
# End to end: vqtok encode on CIFAR-10 JPEGs against the bare encoder


def bare_throughput(tokenizer: vqtok.Autoencoder, batch_size: int, batches: int, *, device: torch.device,
                    precision: str) -> float:
    """Images/s of range conversion + encode on uint8 batches already in memory (on the device)."""
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    with torch.inference_mode(), encode_autocast(device, precision):
        tokenizer.encode(uint8_to_range(images, tokenizer.config.value_range))  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            tokenizer.encode(uint8_to_range(images, tokenizer.config.value_range))
        sync(device)
        return batches * batch_size / (time.perf_counter() - start)


def end_to_end_throughput(tokenizer_dir: Path, images: Path, out: Path, *, batch_size: int, limit: int,
                          workers: int | None, device: torch.device, compile: bool,
                          precision: str) -> tuple[float, int]:
    """Images/s of a whole `encode_dataset` run, and the store's shard bytes."""
    start = time.perf_counter()
    encode_dataset(str(tokenizer_dir), DataConfig(source="folder", path=str(images), limit=limit), out,
                   batch_size=batch_size, shard_size=5000, num_workers=workers, device=device, progress=False,
                   compile=compile, precision=precision)
    elapsed = time.perf_counter() - start
    shard_bytes = sum(p.stat().st_size for p in (out / "shards").glob("*.npy"))
    return limit / elapsed, shard_bytes


def store_rows(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model_config: AutoencoderConfig = load_yaml(ROOT / "configs" / "cifar10_vq.yaml", TrainConfig).model
    torch.manual_seed(0)
    tokenizer = vqtok.Autoencoder(model_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer.save_pretrained(tokenizer_dir)
        tokenizer.to(device)
        batches = max(2, args.limit // args.batch_size // 4)
        with _encoder_prepared(tokenizer, compile=args.compile, channels_last=False):
            bare = bare_throughput(tokenizer, args.batch_size, batches, device=device, precision=args.precision)
        e2e, shard_bytes = end_to_end_throughput(tokenizer_dir, args.images, Path(tmp) / "store",
                                                 batch_size=args.batch_size, limit=args.limit, workers=args.workers,
                                                 device=device, compile=args.compile, precision=args.precision)
        with _encoder_prepared(tokenizer, compile=args.compile, channels_last=False):
            bare_after = bare_throughput(tokenizer, args.batch_size, batches, device=device,
                                         precision=args.precision)  # the machine's speed drifts: bracket it
    bare_mean = (bare + bare_after) / 2
    result = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "device": device_name(device), "batch_size": args.batch_size, "images": args.limit, "workers": args.workers,
        "compile": args.compile, "precision": args.precision,
        "bare_images_per_s": [round(bare, 1), round(bare_after, 1)], "end_to_end_images_per_s": round(e2e, 1),
        "ratio": round(e2e / bare_mean, 3), "bytes_per_image": round(shard_bytes / args.limit, 1),
        "codes_bytes_per_image": 8 * 8 * 2, "grid": list(model_config.latent_grid),
    }
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256, help="model rows: image side in pixels (a multiple of 16)")
    parser.add_argument("--batch", type=int, default=32, help="model rows: images per call")
    parser.add_argument("--codes", type=int, default=1024, choices=(1024, 16384), help="model rows: codebook size")
    parser.add_argument("--small", action="store_true", help="model rows: halve every width")
    parser.add_argument("--warmup", type=int, default=3, help="model rows: untimed calls of each variant")
    parser.add_argument("--reps", type=int, default=10, help="model rows: timed rounds")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="model rows: largest decode difference from diffusers, relative to the images' scale")
    parser.add_argument("--images", type=Path, default=None,
                        help="end to end instead: an extracted CIFAR-10 split folder, e.g. train/")
    parser.add_argument("--limit", type=int, default=10240, help="end to end: images to encode")
    parser.add_argument("--batch-size", type=int, default=256, help="end to end: the store's batch size")
    parser.add_argument("--workers", type=int, default=None, help="end to end: DataLoader workers (default: "
                        "encode_dataset's)")
    parser.add_argument("--compile", action="store_true", help="end to end: vqtok encode --compile")
    parser.add_argument("--precision", choices=("float32", "bf16"), default="float32",
                        help="end to end: vqtok encode --precision")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.size % 16:
        parser.error(f"--size {args.size} is not a multiple of 16")
    result = store_rows(args) if args.images is not None else model_rows(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
