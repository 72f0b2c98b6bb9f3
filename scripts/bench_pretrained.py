"""Converted tokenizers against diffusers on the same weights: agreement, then encode/decode throughput (CPU).

One model of each family, random weights, float32, inference mode, one process, `--threads` threads for both:

* sd-vae: an AutoencoderKL shaped like stabilityai/sd-vae-ft-mse (widths 128, 256, 512, 512, two blocks per level,
  4 latent channels, mid-block attention; f = 8). Loaded with `vqtok.load` from the diffusers folder.
* vqgan-f16: a VQModel shaped like taming's ImageNet f16 VQGAN (ch 128, ch_mult 1, 1, 2, 2, 4, attention in the
  lowest level - 16x16 at 256 px - and the mid block, z 256, `--vqgan-codes` codes of dim 256). `vqtok.load` from
  the diffusers folder.
* llamagen-vq16: LlamaGen's VQ-16 (the same encoder/decoder, z 256, 16,384 codes of dim 8, l2-normalised). The
  diffusers VQModel with a unit-norm codebook is its reference: nearest-code search on unit codes ranks codes by
  e.z as the l2-normalised search does, and the lookups agree. vqtok loads it from a LlamaGen-style folder
  (config.json of ModelArgs + model.safetensors) whose tensors are the diffusers model's, renamed by hand here.

The codebooks are drawn at the scale of the encoder's features (so codes spread over it). `--small` halves every
width. Agreement, checked before timing (the script stops if the codes differ or an error exceeds `--tolerance`
times the output's scale): max abs error of the posterior mean and std (KL), the fraction of equal codes (VQ), and of
the decoded images from the same latents/codes. Timing: `--warmup` calls of each, then `--reps` repetitions that
alternate the two libraries (vqtok first on even repetitions, diffusers first on odd ones), so the machine's drift
hits both; the figures are the medians, and `paired` is the median of per-repetition ratios. What is timed:

    encode  vqtok: tok.encode(x)            diffusers: vae.encode(x).latent_dist  (KL)
                                                       vq.quantize(vq.encode(x).latents) -> indices  (VQ)
    decode  vqtok: tok.decode(z or codes)   diffusers: vae.decode(z).sample  (KL)
                                                       vq.decode(get_codebook_entry(codes), force_not_quantize=True)

    python scripts/bench_pretrained.py --threads 2 --size 128 --batch 1 --out bench_pretrained.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

import vqtok

FAMILIES = ("sd-vae", "vqgan-f16", "llamagen-vq16")
LEVEL_MULT = (1, 1, 2, 2, 4)  # taming's f16 VQGAN and LlamaGen's VQ-16


def diffusers_model(family: str, *, small: bool, vqgan_codes: int, resolution: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL, VQModel

    scale = 2 if small else 1
    if family == "sd-vae":  # stabilityai/sd-vae-ft-mse's config.json, less what is already the default
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=[w // scale for w in (128, 256, 512, 512)], sample_size=resolution,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        )
    widths = [128 // scale * m for m in LEVEL_MULT]
    n = len(widths)
    codes, dim = (vqgan_codes, 256) if family == "vqgan-f16" else (16384, 8)
    return VQModel(
        in_channels=3, out_channels=3, latent_channels=256, layers_per_block=2, norm_num_groups=32,
        block_out_channels=widths, sample_size=resolution, num_vq_embeddings=codes, vq_embed_dim=dim,
        down_block_types=["DownEncoderBlock2D"] * (n - 1) + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (n - 1),
    )


def spread_codebook(model: torch.nn.Module, x: torch.Tensor, *, unit: bool) -> None:
    """Codebook rows drawn from N(0, s^2) with s the features' own spread (unit rows for LlamaGen)."""
    with torch.inference_mode():
        h = model.encode(x).latents
    generator = torch.Generator().manual_seed(1)
    weight = model.quantize.embedding.weight
    rows = torch.randn(weight.shape, generator=generator)
    rows = torch.nn.functional.normalize(rows, dim=1) if unit else rows * h.std()
    with torch.no_grad():
        weight.copy_(rows)


# diffusers VQModel names -> LlamaGen's (tokenizer/tokenizer_image/vq_model.py), written out independently of
# vqtok.pretrained.layouts; both count the decoder's levels from the lowest resolution.
LLAMAGEN_RENAMES = (
    (r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.", r"\1.conv_blocks.\3.res."),
    (r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.attentions\.", r"\1.conv_blocks.\3.attn."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.conv_blocks.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.conv_blocks.\1.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.0."),
    (r"\.mid_block\.attentions\.0\.", ".mid.1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.2."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".proj_out."),
    (r"\.conv_norm_out\.", ".norm_out."),
)


def save_llamagen(model: torch.nn.Module, folder: Path, *, ch: int) -> None:
    """A LlamaGen Hub-style folder (config.json of ModelArgs, model.safetensors) holding the VQModel's weights."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        for pattern, replacement in LLAMAGEN_RENAMES:
            name = re.sub(pattern, replacement, name)
        if re.search(r"\.(q|k|v|proj_out)\.weight$", name):  # Linear [C, C] -> LlamaGen's 1x1 conv [C, C, 1, 1]
            tensor = tensor[:, :, None, None]
        tensors[name] = tensor.contiguous()
    tensors["quantize.codebook_used"] = torch.zeros(65536)  # what LlamaGen checkpoints carry besides
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    args = {"codebook_size": 16384, "codebook_embed_dim": 8, "codebook_l2_norm": True, "z_channels": 256,
            "encoder_ch_mult": list(LEVEL_MULT), "decoder_ch_mult": list(LEVEL_MULT), "ch": ch}
    (folder / "config.json").write_text(json.dumps(args))


class Pair:
    """The two implementations' encode and decode of one family, as closures over the same inputs."""

    def __init__(self, family: str, ref: torch.nn.Module, tok: vqtok.Autoencoder, x: torch.Tensor):
        self.family, self.ref, self.tok, self.x = family, ref, tok, x
        self.gaussian = tok.is_gaussian
        with torch.inference_mode():
            self.latents = tok.encode(x).mean if self.gaussian else tok.encode(x)

    def ref_encode(self) -> Any:
        if self.gaussian:
            return self.ref.encode(self.x).latent_dist
        _, _, (_, _, codes) = self.ref.quantize(self.ref.encode(self.x).latents)
        return codes.view(self.latents.shape)

    def ref_decode(self) -> torch.Tensor:
        if self.gaussian:
            return self.ref.decode(self.latents).sample
        b, h, w = self.latents.shape
        q = self.ref.quantize.get_codebook_entry(self.latents.flatten(), (b, h, w, self.ref.quantize.vq_embed_dim))
        return self.ref.decode(q, force_not_quantize=True).sample

    def tok_encode(self) -> Any:
        return self.tok.encode(self.x)

    def tok_decode(self) -> torch.Tensor:
        return self.tok.decode(self.latents)

    def agreement(self) -> dict[str, float]:
        with torch.inference_mode():
            ours, theirs = self.tok_encode(), self.ref_encode()
            out = {}
            if self.gaussian:
                out["mean_max_abs_err"] = (ours.mean - theirs.mean).abs().max().item()
                out["std_max_abs_err"] = (ours.std - theirs.std).abs().max().item()
                out["latent_scale"] = theirs.mean.abs().max().item()
            else:
                out["codes_equal"] = (ours == theirs).double().mean().item()
                out["codes_distinct"] = int(theirs.unique().numel())
            decoded = self.ref_decode()
            out["decode_max_abs_err"] = (self.tok_decode() - decoded).abs().max().item()
            out["image_scale"] = decoded.abs().max().item()
        return out


def disagreement(agreement: dict[str, float], tolerance: float) -> str | None:
    """Why the two are not the same model on these inputs (None: they are): codes differ, or an output differs by more
    than `tolerance` relative to its scale."""
    if agreement.get("codes_equal", 1.0) < 1.0:
        return f"only {agreement['codes_equal']:.2%} of the codes are equal"
    pairs = (("mean_max_abs_err", "latent_scale"), ("std_max_abs_err", "latent_scale"),
             ("decode_max_abs_err", "image_scale"))
    for err, scale in pairs:
        if err in agreement and agreement[err] > tolerance * max(agreement[scale], 1.0):
            return f"{err} {agreement[err]:.3g} exceeds {tolerance:g} x {scale} {agreement[scale]:.3g}"
    return None


def interleaved(ours: Callable[[], Any], theirs: Callable[[], Any], *, warmup: int,
                reps: int) -> dict[str, list[float]]:
    """Seconds per call of each, repetitions alternating which goes first."""
    times: dict[str, list[float]] = {"vqtok": [], "diffusers": []}
    with torch.inference_mode():
        for _ in range(warmup):
            ours()
            theirs()
        for r in range(reps):
            order = (("vqtok", ours), ("diffusers", theirs)) if r % 2 == 0 else (("diffusers", theirs), ("vqtok", ours))
            for name, fn in order:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def build(family: str, args: argparse.Namespace, tmp: Path, x: torch.Tensor) -> Pair:
    torch.manual_seed(0)
    ref = diffusers_model(family, small=args.small, vqgan_codes=args.vqgan_codes, resolution=256).eval()
    if family != "sd-vae":
        spread_codebook(ref, x, unit=family == "llamagen-vq16")
    folder = tmp / family
    if family == "llamagen-vq16":
        save_llamagen(ref, folder, ch=128 // (2 if args.small else 1))
    else:
        ref.save_pretrained(folder)
    tok = vqtok.load(folder).eval()
    return Pair(family, ref, tok, x)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (a multiple of 16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--small", action="store_true", help="halve every width")
    parser.add_argument("--vqgan-codes", type=int, default=1024, choices=(1024, 16384))
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest output difference, relative to the output's scale, still called agreement")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import diffusers

    torch.set_num_threads(args.threads)
    print(f"vqtok {vqtok.__version__} from {Path(vqtok.__file__).parent}, torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, {torch.get_num_threads()} threads, {cpu_name()}", flush=True)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            pair = build(family, args, Path(tmp), x)
            agreement = pair.agreement()
            print(f"{family}: agreement {json.dumps({k: float(f'{v:.3g}') for k, v in agreement.items()})}",
                  flush=True)
            if (why := disagreement(agreement, args.tolerance)) is not None:
                raise SystemExit(f"{family}: vqtok and diffusers disagree ({why}); not timing different models")
            for op, ours, theirs in (("encode", pair.tok_encode, pair.ref_encode),
                                     ("decode", pair.tok_decode, pair.ref_decode)):
                times = interleaved(ours, theirs, warmup=args.warmup, reps=args.reps)
                t_ours, t_theirs = (statistics.median(times[k]) for k in ("vqtok", "diffusers"))
                paired = statistics.median(b / a for a, b in zip(times["vqtok"], times["diffusers"]))
                rows.append({"model": family, "op": op, "size": args.size, "batch": args.batch,
                             "vqtok_img_per_s": args.batch / t_ours, "diffusers_img_per_s": args.batch / t_theirs,
                             "ratio": t_theirs / t_ours, "paired_ratio": paired, "seconds": times,
                             "agreement": agreement})
                print(f"  {op}: vqtok {args.batch / t_ours:.3f} img/s, diffusers {args.batch / t_theirs:.3f} img/s, "
                      f"ratio {t_theirs / t_ours:.3f} (paired {paired:.3f})", flush=True)
            del pair

    print("\n| model | op | image size | batch | vqtok img/s | diffusers img/s | vqtok / diffusers (paired) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['op']} | {r['size']}x{r['size']} | {r['batch']} | {r['vqtok_img_per_s']:.3f} | "
              f"{r['diffusers_img_per_s']:.3f} | {r['ratio']:.3f} ({r['paired_ratio']:.3f}) |")
    result = {"vqtok": vqtok.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "python": platform.python_version(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "small": args.small, "vqgan_codes": args.vqgan_codes, "warmup": args.warmup, "reps": args.reps,
              "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
