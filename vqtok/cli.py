"""The `vqtok` command (also `python -m vqtok`, and `accelerate launch -m vqtok ...` for several processes)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from vqtok.version import __version__

MAX_GRID_IMAGES = 1024  # a PNG grid shows at most this many images (sample: the first ones; decode: --n)
SAMPLE_BATCH = 64  # vqtok sample's default batch: codes sampled, decoded and written this many at a time
DECODE_BATCH = 256  # codes decoded at once
ARITHMETIC_ROWS = 8  # vqtok arithmetic --apply-data: images moved by default
DATA_HELP = ("the images: digits (built in) | DIR or folder:PATH (an image folder; class sub-folders give labels) | "
             "idx:IMAGES[,LABELS] | amat:PATH | torchvision:NAME:ROOT")
PRIOR_ONLY = {"top_k": "--top-k", "top_p": "--top-p", "cfg_scale": "--cfg-scale", "tokenizer": "--tokenizer",
              "codes": "--codes", "compile": "--compile"}  # vqtok sample's options for a transformer prior


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqtok", description="Image tokenizers for generative transformers.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"vqtok {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quickstart = commands.add_parser(
        "quickstart", help="the whole pipeline on the built-in digits: tokenizer, token stores, prior, new samples")
    quickstart.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    quickstart.add_argument("--steps", type=int, default=600, help="tokenizer optimizer steps (default: 600)")
    quickstart.add_argument("--prior-steps", type=int, default=600, help="prior optimizer steps (default: 600)")
    quickstart.set_defaults(run=_quickstart)

    train = commands.add_parser("train", help="train a tokenizer from a YAML config")
    _run_options(train, "a TrainConfig", "model.bottleneck.beta=0.5")
    train.set_defaults(run=_train)

    train_prior = commands.add_parser("train-prior", help="train a transformer prior on a token store")
    _run_options(train_prior, "a PriorTrainConfig", "prior.n_layer=4")
    train_prior.add_argument("--verify", action="store_true",
                             help="check every token store file's sha256 before training (verify_tokens: true)")
    train_prior.add_argument("--tokenizer", default=None, metavar="PATH",
                             help="where the token store's tokenizer is now, if its folder moved (a folder or Hub "
                             "id; its weights must be the ones the store records; tokenizer: PATH in the config)")
    train_prior.set_defaults(run=_train_prior)

    sample = commands.add_parser(
        "sample", help="sample codes from a prior and decode them into images, or sample a VAE's own prior")
    model = sample.add_mutually_exclusive_group(required=True)
    model.add_argument("--prior", help="a transformer prior: local folder or Hub repo id[@revision]")
    model.add_argument("--model", help="a VAE (Gaussian autoencoder, class-conditional or not, or hierarchical VAE), "
                                       "sampled from its own prior: local folder or Hub repo id[@revision]")
    sample.add_argument("--n", type=positive_int, default=64,
                        help=f"number of images (default 64); more than {MAX_GRID_IMAGES} need --images-dir (or "
                        "--codes)")
    sample.add_argument("--class", dest="label", type=class_choice, default=None, metavar="C[,C...]|all",
                        help="the class of every sample (a class-conditional prior or VAE), or a list of classes "
                        "(or 'all': every class), n / k samples of each of the k in turn, one grid row per class; "
                        "default: unconditional (the null class). A class-conditional tokenizer decodes a prior's "
                        "samples with their class when the prior has its number of classes, else with its null label")
    sample.add_argument("--temperature", type=nonnegative_float, default=1.0,
                        help="0: greedy for a prior; for a VAE, the factor on its prior's standard deviations, 0 "
                        "its mean (default 1)")
    sample.add_argument("--top-k", type=positive_int, default=None,
                        help="sample each code from the K most likely only (a prior; default: all)")
    sample.add_argument("--top-p", type=probability, default=None,
                        help="sample each code from the smallest set of codes whose probability reaches P (nucleus "
                        "sampling; a prior; default: all)")
    sample.add_argument("--cfg-scale", type=finite_float, default=None,
                        help="classifier-free guidance scale (needs --class; default 1: none)")
    sample.add_argument("--seed", type=random_seed, default=0,
                        help="random seed: the same seed, --n and --batch-size give the same images")
    sample.add_argument("--batch-size", type=positive_int, default=SAMPLE_BATCH,
                        help=f"samples generated and decoded at once (default {SAMPLE_BATCH}); the seed's samples "
                        "depend on it")
    sample.add_argument("--tokenizer", default=None,
                        help="decode with this tokenizer instead of the recorded one (it must be the same weights)")
    sample.add_argument("--compile", action="store_true", default=None,
                        help="a prior's static KV cache and compiled decode step (torch.compile; CUDA graphs on a "
                        "GPU): faster for many samples after a compilation of seconds to minutes; the same codes")
    sample.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    sample.add_argument("--out", required=True,
                        help=f"PNG grid to write (of the first {MAX_GRID_IMAGES} images at most)")
    sample.add_argument("--images-dir", default=None, help="also write each image as a PNG into this folder")
    sample.add_argument("--codes", default=None, help="also write the sampled codes [n, h, w] "
                        "([n, h, w, depth] for a residual VQ) to this .npy file")
    sample.set_defaults(run=_sample)

    evaluate = commands.add_parser("eval", help="PSNR, SSIM, codebook usage (VQ), likelihood bounds and "
                                                "posterior-collapse diagnostics (VAEs) of a tokenizer on a dataset")
    evaluate.add_argument("tokenizer", help="local folder or Hub repo id[@revision]")
    evaluate.add_argument("--data", required=True, help=DATA_HELP)
    evaluate.add_argument("--split", choices=["train", "test"], default="test",
                          help="the split of a source that has both")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N images only")
    _window_options(evaluate)
    evaluate.add_argument("--iwae", type=positive_int, default=None, metavar="K",
                          help="also report the importance-weighted bound with K samples per image (VAEs with a "
                          "discrete likelihood)")
    evaluate.add_argument("--iwae-batch", type=positive_int, default=None, metavar="N",
                          help="with --iwae: importance samples x images evaluated at once (default 1024: "
                          "vqtok.train.evaluate.IWAE_BATCH)")
    evaluate.add_argument("--batch-size", type=positive_int, default=64, help="images evaluated at once")
    evaluate.add_argument("--out", default=None, help="also write the metrics as JSON here")
    evaluate.add_argument("--lpips", default=None, metavar="WEIGHTS",
                          help="also report LPIPS, with these LPIPS-VGG16 weights (vqtok convert-lpips)")
    evaluate.add_argument("--diagnostics", default=None, metavar="FILE.json",
                          help="also write the per-element statistics as JSON here (a new file): for VAEs the KL of "
                          "every latent element, the variance of its posterior mean, whether it is active, and the "
                          "elements ordered by KL; for VQ tokenizers the count of every code")
    evaluate.set_defaults(run=_eval)

    score = commands.add_parser(
        "score", help="per-image anomaly scores of a tokenizer on a dataset (reconstruction error, likelihood bounds, "
                      "a prior's bits) as a CSV; with --reference-data, each score's AUROC and a histogram PNG")
    score.add_argument("tokenizer", help="local folder or Hub repo id[@revision]")
    score.add_argument("--data", required=True,
                       help=f"the images to score (with --reference-data: the suspected anomalies): {DATA_HELP}")
    score.add_argument("--reference-data", default=None, metavar="SPEC",
                       help="in-distribution images (the same forms as --data): scored too, and each score's AUROC "
                       "of telling --data from them is printed and drawn")
    score.add_argument("--split", choices=["train", "test"], default="test",
                       help="the split of a source that has both (both sets)")
    score.add_argument("--prior", default=None,
                       help="a transformer prior over this VQ tokenizer's codes (folder or Hub id[@revision]): adds "
                       "prior_bits, the codes' -log2 p under its unconditional pass")
    score.add_argument("--iwae", type=positive_int, default=None, metavar="K",
                       help="also score the importance-weighted bound with K samples per image, iwae_nats (VAEs with a "
                       "discrete likelihood)")
    score.add_argument("--limit", type=positive_int, default=None,
                       help="score the first N images of each set only (of --data and of --reference-data)")
    _window_options(score)
    score.add_argument("--batch-size", type=positive_int, default=64, help="images scored at once")
    score.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    score.add_argument("--out", required=True,
                       help="CSV file to write, a row per image: set (data, reference), index in its source, each "
                       "score; must not exist")
    score.add_argument("--histogram", default=None, metavar="PNG",
                       help="with --reference-data, the PNG of both sets' score distributions (default: beside --out, "
                       "NAME_histogram.png); must not exist")
    score.add_argument("--dataset-labels", action="store_true",
                       help="a class-conditional model scores each image with its label from the data, as vqtok eval "
                       "does (default: with its null label, the unconditional pass)")
    score.set_defaults(run=_score)

    traverse = commands.add_parser(
        "traverse", help="a latent traversal grid of one image: one latent element of a Gaussian autoencoder or "
                         "hierarchical VAE varied at a time (rows, by KL), over prior standard deviations (columns)")
    traverse.add_argument("tokenizer", help="a Gaussian autoencoder or hierarchical VAE: local folder or Hub repo "
                          "id[@revision]")
    traverse.add_argument("image", help="the image file (resized and cropped as the model's config says)")
    traverse.add_argument("--out", required=True, help="the PNG grid to write (a new file)")
    traverse.add_argument("--dims", type=positive_int, default=8, metavar="K",
                          help="rows: the elements of largest average KL (a hierarchical VAE: per group)")
    traverse.add_argument("--steps", type=int_at_least_2, default=7, metavar="S",
                          help="columns: values evenly spaced over [-range, range] prior standard deviations")
    traverse.add_argument("--range", dest="span", type=positive_float, default=3.0, metavar="R",
                          help="the largest change, in prior standard deviations")
    traverse.add_argument("--data", default=None,
                          help="order the elements by their average KL over these images (default: the image's own "
                          "KL); " + DATA_HELP)
    traverse.add_argument("--split", choices=["train", "test"], default=None,
                          help="with --data: the split of a source that has both (default test)")
    traverse.add_argument("--limit", type=positive_int, default=None, metavar="N",
                          help="with --data: the first N images only (default: all)")
    traverse.add_argument("--class", dest="label", type=nonnegative_int, default=None,
                          help="the image's class, for a class-conditional model (default: its null label)")
    traverse.add_argument("--batch-size", type=positive_int, default=None,
                          help="with --data: images encoded at once (default 64)")
    traverse.set_defaults(run=_traverse)

    encode = commands.add_parser("encode", help="encode a dataset into a token store (resumable, multi-process)")
    encode.add_argument("--tokenizer", required=True, help="local folder or Hub repo id[@revision]")
    encode.add_argument("--data", required=True, help=DATA_HELP)
    encode.add_argument("--split", choices=["train", "test"], default="train",
                        help="the split of a source that has both")
    encode.add_argument("--out", required=True, help="the store folder (re-run with the same arguments to resume)")
    encode.add_argument("--batch-size", type=positive_int, default=256,
                        help="images encoded at once; resuming a store needs the same")
    encode.add_argument("--shard-size", type=positive_int, default=10_000,
                        help="images per shard file, the unit that is written whole and skipped on resume")
    encode.add_argument("--hflip", action="store_true", help="also store the codes of horizontally flipped images")
    encode.add_argument("--num-workers", type=nonnegative_int, default=None,
                        help="data loader processes reading the images; 0 reads them in the main process (default: "
                        "min(8, CPUs per process) on a GPU, min(4, CPUs per process) on a CPU)")
    encode.add_argument("--limit", type=positive_int, default=None, help="encode the first N images only")
    encode.add_argument("--compile", action="store_true",
                        help="torch.compile the encoder (an autoencoder's; worth it on a GPU for large datasets: the "
                        "first batches wait for the compilation); codes as without, up to float rounding, not recorded")
    encode.add_argument("--precision", choices=("float32", "bf16"), default="float32",
                        help="the encoder's arithmetic: bf16 autocast is faster on GPUs with bf16 units, but its codes "
                        "differ from float32's: the store records it and a resume needs the same (default float32)")
    _window_options(encode)
    encode.set_defaults(run=_encode)

    decode = commands.add_parser("decode", help="decode stored codes back to images (a PNG grid)")
    decode.add_argument("codes", help="a token store folder, or a .npy file of codes [n, h, w] ([n, h, w, r]: a "
                        "prefix of a residual VQ's levels; latents [n, dim, h, w] for a Gaussian "
                        "tokenizer; needs --tokenizer; not for a hierarchical VAE: decode its store). A "
                        "class-conditional tokenizer decodes a store's codes with the store's labels, a .npy file's "
                        "with its null label")
    decode.add_argument("--out", required=True, help="PNG file to write")
    decode.add_argument("--tokenizer", default=None, help="for a .npy file: the tokenizer folder or Hub id")
    decode.add_argument("--n", type=grid_count, default=64,
                        help=f"number of images (default 64, at most {MAX_GRID_IMAGES})")
    decode.set_defaults(run=_decode)

    interpolate = commands.add_parser(
        "interpolate", help="a PNG strip from image A to image B through the latent space: A, the steps, B")
    interpolate.add_argument("tokenizer", help="local folder or Hub repo id[@revision] (a Gaussian or VQ tokenizer, or "
                             "a hierarchical VAE)")
    interpolate.add_argument("a", metavar="A", help="the image at the strip's left end (any format PIL reads; "
                             "preprocessed as the model's preprocess does)")
    interpolate.add_argument("b", metavar="B", help="the image at the strip's right end")
    interpolate.add_argument("--steps", type=grid_count, default=8, metavar="K",
                             help="decoded steps between the inputs, both latents included (t = 0 and 1: the "
                             "reconstructions of A and B); the strip shows input A, the steps, input B")
    interpolate.add_argument("--method", choices=("slerp", "linear"), default=None,
                             help="the path between the latents (default: slerp for Gaussian latents, linear for a "
                             "VQ tokenizer's features, whose steps are quantized)")
    interpolate.add_argument("--label", type=nonnegative_int, default=None, metavar="N",
                             help="the class for a class-conditional model (default: its unconditional pass)")
    interpolate.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    interpolate.add_argument("--out", required=True, help="PNG strip to write (a new file: an existing one is refused)")
    interpolate.set_defaults(run=_interpolate)

    arithmetic = commands.add_parser(
        "arithmetic", help="move images along an attribute vector (the mean latent of one class minus another's): "
                           "a PNG grid, one row per image, its input then one column per strength")
    arithmetic.add_argument("tokenizer", help="local folder or Hub repo id[@revision]")
    arithmetic.add_argument("--data", required=True, metavar="SPEC",
                            help="the labelled images the class means come from: digits (built in) | DIR or "
                            "folder:PATH with class sub-folders | idx:IMAGES,LABELS | torchvision:NAME:ROOT")
    arithmetic.add_argument("--split", choices=["train", "test"], default="test",
                            help="the split of a source that has both (--data and --apply-data)")
    arithmetic.add_argument("--from-class", type=nonnegative_int, required=True, metavar="A",
                            help="the vector points away from this class's mean latent")
    arithmetic.add_argument("--to-class", type=nonnegative_int, required=True, metavar="B",
                            help="... towards this class's mean latent")
    arithmetic.add_argument("--limit", type=positive_int, default=None, metavar="N",
                            help="average at most N images of each class (default: all)")
    apply_to = arithmetic.add_mutually_exclusive_group(required=True)
    apply_to.add_argument("--images", nargs="+", metavar="IMG", help="image files to move (one row each)")
    apply_to.add_argument("--apply-data", metavar="SPEC", help="move the first images of this source (one row each; "
                          "the same forms as --data)")
    arithmetic.add_argument("--apply-limit", type=grid_count, default=None, metavar="N",
                            help=f"with --apply-data: how many of its images (default {ARITHMETIC_ROWS})")
    arithmetic.add_argument("--strengths", type=float_list, default=[-1.0, 0.0, 1.0, 2.0], metavar="S,S,...",
                            help="the multiples of the vector added to each image's latents, one column each "
                            "(default -1,0,1,2; 0 is the reconstruction)")
    arithmetic.add_argument("--skip-unreadable", action="store_true",
                            help="skip the files of an image folder (--data, --apply-data) that cannot be decoded, "
                            "instead of stopping at the first")
    arithmetic.add_argument("--batch-size", type=positive_int, default=64, help="images encoded at once")
    arithmetic.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    arithmetic.add_argument("--out", required=True, help="PNG grid to write (a new file: an existing one is refused)")
    arithmetic.set_defaults(run=_arithmetic)
    # "--strengths -1,0,1" is a value, not an unknown option: let argparse take a comma list that starts with a minus
    arithmetic._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+-]*$")

    push = commands.add_parser("push", help="upload a saved model folder to the Hugging Face Hub")
    push.add_argument("folder", help="a saved model folder (a training run's tokenizer/ or prior/ also uploads the "
                      "run's config.yaml and last image grid)")
    push.add_argument("repo_id", help="the Hub repository, org/name (created if it does not exist)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--branch", default=None, help="commit to this existing branch (default: main)")
    push.add_argument("--message", default="Upload vqtok model", help="the commit message")
    push.add_argument("--license", default=None,
                      help="the weights' licence for the model card, a Hub licence id (e.g. apache-2.0, mit; "
                      "default: the card's own, a converted model's original's)")
    push.set_defaults(run=_push)

    info = commands.add_parser(
        "info", help="what a model is: a vqtok model's config and codebook statistics, or a convertible checkpoint's "
                     "format, latent shape, vocabulary and parameters (its weights are not loaded)")
    info.add_argument("source", metavar="MODEL", help="local folder, file, or Hub repo id[@revision]")
    info.add_argument("--subfolder", default=None, help="a folder inside it (a diffusers pipeline's 'vae')")
    _source_options(info)
    info.set_defaults(run=_info)

    convert = commands.add_parser(
        "convert", help="convert a diffusers, LDM/taming or LlamaGen tokenizer into a vqtok folder (ready to push)")
    convert.add_argument("source", help="a .safetensors/.ckpt/.pt file, a folder, or a Hub repo id[@revision]")
    convert.add_argument("out", help="the vqtok folder to write (new, or empty)")
    convert.add_argument("--subfolder", default=None, help="a folder inside the source (a diffusers pipeline's 'vae')")
    convert.add_argument("--license", default=None,
                         help="the original's licence, recorded in config.json and the model card (e.g. "
                              "openrail++); a diffusers repo's card names it itself")
    _source_options(convert)
    convert.set_defaults(run=_convert)

    convert_lpips = commands.add_parser(
        "convert-lpips", help="make the LPIPS-VGG16 weights file (a config's perceptual.weights, eval --lpips) from "
                              "torchvision's VGG16 and LPIPS' heads; nothing is downloaded")
    convert_lpips.add_argument("--vgg", required=True, help="torchvision's ImageNet VGG16 weights, vgg16-397923af.pth")
    convert_lpips.add_argument("--heads", default=None,
                               help="LPIPS' v0.1 linear heads, vgg.pth (default: the installed lpips package's copy)")
    convert_lpips.add_argument("--out", required=True, help="the safetensors file to write (must not exist)")
    convert_lpips.set_defaults(run=_convert_lpips)

    debug_help = "on an error, also show the traceback"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for command in commands.choices.values():  # `vqtok --debug CMD` or `vqtok CMD ... --debug`
        command.formatter_class = HelpFormatter
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` that ends each option's help with its default, unless the help says it already or there is none to
    say (an option off by default, or whose absence means "none": None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default is None or default is False or default == []
                or default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


# ----------------------------------------------------------------------------------------------------------------
# Argument types: bad numbers are refused while parsing, with argparse's usage line and exit status 2.


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def random_seed(text: str) -> int:
    """A random seed: an integer in [0, 2^64)."""
    value = nonnegative_int(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be below 2^64, got {text}")
    return value


def class_choice(text: str) -> int | list[int] | str:
    """vqtok sample's --class: a class (an integer >= 0), a comma-separated list of them, or 'all'."""
    if text == "all":
        return text
    values = [nonnegative_int(part) for part in text.split(",")]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"names a class twice: {text}")
    return values[0] if len(values) == 1 and "," not in text else values


def grid_count(text: str) -> int:
    """A number of images for a PNG grid: 1 .. MAX_GRID_IMAGES."""
    value = positive_int(text)
    if value > MAX_GRID_IMAGES:
        raise argparse.ArgumentTypeError(f"a grid shows at most {MAX_GRID_IMAGES} images, got {text}")
    return value


def finite_float(text: str) -> float:
    """A finite number (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def int_at_least_2(text: str) -> int:
    """An integer >= 2."""
    value = _integer(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got {text}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1]."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _run_options(parser: argparse.ArgumentParser, config_kind: str, example: str) -> None:
    """The arguments every training command takes: the YAML config, overrides, resume and stop."""
    parser.add_argument("config", help=f"YAML file ({config_kind})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set max_steps=100 --set {example}")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in output_dir (made with this config)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in the output_dir of an earlier vqtok run, deleting its checkpoints, "
                             "metrics, samples and exports (other files stay)")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop after STEP with a checkpoint (resume later with --resume)")


LDM_FLAGS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim", "n_embed")


def _source_options(parser: argparse.ArgumentParser) -> None:
    """How `vqtok convert` / `info` read another library's checkpoint (see vqtok.pretrained.convert)."""
    parser.add_argument("--format", choices=("diffusers", "ldm", "llamagen"), default=None,
                        help="the checkpoint's layout (default: from its config.json or tensor names)")
    parser.add_argument("--config", default=None,
                        help="the model's YAML: taming's/LDM's (model.params.ddconfig, embed_dim, n_embed) or "
                             "LlamaGen's ModelArgs; default: read off the tensors' shapes")
    ldm = parser.add_argument_group("a taming/LDM ddconfig given as flags (instead of --config)")
    ldm.add_argument("--ch", type=positive_int, help="ddconfig ch: the base channel count")
    ldm.add_argument("--ch-mult", type=int_list, help="ddconfig ch_mult: channel multipliers per level, e.g. 1,1,2,2,4")
    ldm.add_argument("--num-res-blocks", type=positive_int, help="ddconfig num_res_blocks: residual blocks per level")
    ldm.add_argument("--attn-resolutions", type=int_list,
                     help="ddconfig attn_resolutions: feature sizes with attention, e.g. 16 (empty: none)")
    ldm.add_argument("--z-channels", type=positive_int, help="ddconfig z_channels: the encoder's output channels")
    ldm.add_argument("--embed-dim", type=positive_int, help="embed_dim: the latent (or code vector) dimension")
    ldm.add_argument("--n-embed", type=positive_int, help="codebook size (a VQ; without it, a KL first stage)")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="the image size the config's attention resolutions refer to (default 256)")
    parser.add_argument("--norm-groups", type=positive_int, default=None,
                        help="GroupNorm groups, when read off the shapes (default 32)")
    parser.add_argument("--l2-normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="codes on the unit sphere, when read off the shapes (default: LlamaGen's are)")
    parser.add_argument("--scaling-factor", type=finite_float, default=None,
                        help="the latent scaling a diffusion model expects, for a file without a config "
                             "(FLUX's ae.safetensors: 0.3611)")
    parser.add_argument("--shift-factor", type=finite_float, default=None, help="likewise (FLUX: 0.1159)")


def int_list(text: str) -> list[int]:
    """Comma-separated integers, e.g. 1,1,2,2,4 (empty: none)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    """Comma-separated finite numbers, at least one, e.g. -1,0,1,2."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected one or more finite numbers, got {text!r}")
    return values


def _conversion_options(args: argparse.Namespace) -> dict[str, Any]:
    """`vqtok.pretrained.plan`/`convert` keywords from the command line; ddconfig flags make a taming config."""
    flags = {name: getattr(args, name) for name in LDM_FLAGS if getattr(args, name) is not None}
    config: Any = args.config
    if flags:
        if config is not None:
            named = ", ".join("--" + f.replace("_", "-") for f in flags)
            raise ValueError(f"--config and the ddconfig flags ({named}) both describe the model; give one")
        if args.format not in (None, "ldm"):
            raise ValueError(f"the ddconfig flags describe a taming/LDM model, but --format is {args.format}")
        config = {**flags, "resolution": args.resolution or 256, "double_z": "n_embed" not in flags}
        resolution = None
    else:
        resolution = args.resolution
    from vqtok.hub import split_revision

    source, revision = split_revision(args.source)
    return dict(source=source, revision=revision, subfolder=args.subfolder, format=args.format if not flags else "ldm",
                config=config, resolution=resolution, norm_groups=args.norm_groups, l2_normalize=args.l2_normalize,
                scaling_factor=args.scaling_factor, shift_factor=args.shift_factor)


def _window_options(parser: argparse.ArgumentParser) -> None:
    """--offset, --binarize and --skip-unreadable, for the commands that read a dataset (with --limit: which images,
    and how)."""
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="skip and count the files of an image folder that cannot be decoded, instead of stopping "
                        "at the first (data.skip_unreadable)")
    parser.add_argument("--offset", type=nonnegative_int, default=0,
                        help="skip the first N images of the source (--limit then counts from there)")
    parser.add_argument("--binarize", type=nonnegative_int, default=None, metavar="SEED",
                        help="binarize each image once, each pixel 255 with probability pixel/255, from a generator "
                        "keyed by SEED and the image's index in the source (data.binarize 'once')")


def parse_data_spec(spec: str, split: str = "train", limit: int | None = None, *, offset: int = 0,
                    binarize_seed: int | None = None, skip_unreadable: bool = False):
    """'digits' | 'folder:PATH' | 'idx:IMAGES[,LABELS]' | 'amat:PATH' | 'torchvision:NAME:ROOT', or the path of an
    existing directory (an image folder, as folder:PATH) -> DataConfig of the `split`, the images offset .. offset +
    limit - 1, binarized once with `binarize_seed` unless it is None, skipping undecodable files with
    `skip_unreadable`. The explicit forms come first: a folder named like one (e.g. `digits`) is ./digits."""
    from vqtok.config import ConfigError, DataConfig

    window: dict[str, Any] = {"split": split, "limit": limit, "offset": offset, "skip_unreadable": skip_unreadable}
    if binarize_seed is not None:
        window.update(binarize="once", binarize_seed=binarize_seed)
    kind, _, rest = spec.partition(":")
    if kind == "digits" and not rest:
        return DataConfig(source="digits", **window)
    if kind == "folder" and rest:
        return DataConfig(source="folder", path=rest, **window)
    if kind == "idx" and rest:
        images, _, labels = rest.partition(",")
        return DataConfig(source="idx", path=images, labels=labels or None, **window)
    if kind == "amat" and rest:
        return DataConfig(source="amat", path=rest, **window)
    if kind == "torchvision" and ":" in rest:
        name, _, root = rest.partition(":")
        return DataConfig(source="torchvision", name=name, path=root, **window)
    if spec and os.path.isdir(spec):
        return DataConfig(source="folder", path=spec, **window)
    raise ConfigError(f"--data {spec!r}: not a directory, nor one of digits, folder:PATH, idx:IMAGES[,LABELS], "
                      "amat:PATH or torchvision:NAME:ROOT")


@contextmanager
def _skip_flag_hint() -> Iterator[None]:
    """An image that cannot be decoded is reported with this command's flag (--skip-unreadable), not the config key
    (data.skip_unreadable) that the library's message names; the message is otherwise kept (a DataLoader worker's
    too)."""
    from vqtok.data.sources import SKIP_HINT, UnreadableImageError

    try:
        yield
    except UnreadableImageError as e:
        message = str(e).replace(SKIP_HINT, "rerun with --skip-unreadable to skip and count such files")
        raise UnreadableImageError(message) from None


def _quickstart(args: argparse.Namespace) -> int:
    from vqtok.train.quickstart import quickstart

    return quickstart(args.out, args.steps, args.prior_steps)


def _train(args: argparse.Namespace) -> int:
    from vqtok.config import TrainConfig, load_yaml
    from vqtok.train import train

    config = load_yaml(args.config, TrainConfig, overrides=args.set)
    folder = train(config, resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite)
    print(f"tokenizer saved to {folder}" if folder else f"stopped at step {args.stop_at}; continue with --resume")
    return 0


def _train_prior(args: argparse.Namespace) -> int:
    import dataclasses

    from vqtok.config import ConfigError, PriorTrainConfig, load_yaml
    from vqtok.train.prior import train_prior

    overrides = list(args.set)
    if args.verify:
        if any(item.partition("=")[0].strip() == "verify_tokens" for item in overrides):
            raise ConfigError("--verify and --set verify_tokens=... both given; use one")
        overrides.append("verify_tokens=true")
    if args.tokenizer is not None and any(item.partition("=")[0].strip() == "tokenizer" for item in overrides):
        raise ConfigError("--tokenizer and --set tokenizer=... both given; use one")
    config = load_yaml(args.config, PriorTrainConfig, overrides=overrides)
    if args.tokenizer is not None:
        config = dataclasses.replace(config, tokenizer=args.tokenizer)  # not parsed as YAML: any path is a path
    folder = train_prior(config, resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite)
    print(f"prior saved to {folder}" if folder else f"stopped at step {args.stop_at}; continue with --resume")
    return 0


def _sample(args: argparse.Namespace) -> int:
    """Sample `--n` images, `--batch-size` at a time, writing each batch before the next: any n works in bounded
    memory, and the grid shows the first MAX_GRID_IMAGES. From a transformer prior (--prior), codes decoded by its
    tokenizer; from a VAE's own prior (--model), which takes none of the prior's options."""
    given = [flag for name, flag in PRIOR_ONLY.items() if getattr(args, name) is not None]
    if args.model is not None and given:
        raise ValueError(f"{', '.join(given)}: for sampling codes from a transformer prior (--prior), not a VAE's own "
                         "prior (--model)")
    device = _device(args.device)
    if args.n > MAX_GRID_IMAGES and not (args.codes or args.images_dir):
        raise ValueError(f"--n {args.n}: the grid (--out) shows at most {MAX_GRID_IMAGES} images; to sample more, "
                         f"write them with --images-dir{' or --codes' if args.prior else ''}")
    out = _output_file(args.out, "--out", image=True)
    codes_path = _output_file(args.codes, "--codes") if args.codes else None
    images_dir = _output_folder(args.images_dir, "--images-dir") if args.images_dir else None
    if args.prior is not None:
        _sample_prior(args, device, out, codes_path, images_dir)
    else:
        batches, nrow = _vae_samples(args, device)
        _write_images(batches, out, images_dir, total=args.n, nrow=nrow)
    written = [f"{out}" + (f" (the first {MAX_GRID_IMAGES})" if args.n > MAX_GRID_IMAGES else "")]
    if codes_path:
        written.append(str(codes_path))
    if images_dir:
        written.append(f"{images_dir}/ ({args.n} PNG files)")
    print(f"sampled {args.n} images; wrote " + ", ".join(written))
    return 0


def _sample_prior(args: argparse.Namespace, device: Any, out: Path, codes_path: Path | None,
                  images_dir: Path | None) -> None:
    import vqtok

    prior = vqtok.load(args.prior, map_location=device)
    if not isinstance(prior, vqtok.TransformerPrior):
        raise ValueError(f"{args.prior} holds a {prior.model_type}, not a transformer prior")
    if args.tokenizer:
        prior.attach_tokenizer(_load_image_model(args.tokenizer, autoencoder_only=True))  # refused unless it is the recorded tokenizer
    from vqtok.models.prior import decode_labels

    tokenizer = prior.tokenizer.to(device)
    shape = (args.n, *prior.config.grid)
    if codes_path:
        _check_free_space(codes_path, math.prod(shape) * 8, "--codes")
    cfg_scale = 1.0 if args.cfg_scale is None else args.cfg_scale
    labels, nrow = _class_labels(args.label, args.n, prior.config.num_classes, f"the prior {args.prior}")
    batches = prior.generate_batches(args.n, labels=labels, temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, cfg_scale=cfg_scale, seed=args.seed,
                                     batch_size=args.batch_size, compile=bool(args.compile))
    _write_samples(batches, tokenizer, shape, out, codes_path, images_dir, nrow=nrow,
                   **decode_labels(prior, tokenizer, labels))


def _class_labels(choice: int | list[int] | str | None, n: int, num_classes: int, name: str) -> tuple[Any, int | None]:
    """--class as the labels of n samples of a model of num_classes classes, and the grid's row length: None
    (unconditional), one class for all (rows as usual), or for a list of k classes (or 'all', every class) n / k
    samples of each in turn, one row per class."""
    import torch

    if choice is None:
        return None, None
    if not num_classes:
        raise ValueError(f"--class: {name} is unconditional (num_classes 0); leave --class out")
    classes = list(range(num_classes)) if choice == "all" else [choice] if isinstance(choice, int) else choice
    beyond = [c for c in classes if c >= num_classes]
    if beyond:
        raise ValueError(f"--class {beyond[0]}: {name} has {num_classes} classes, 0 to {num_classes - 1}")
    if isinstance(choice, int):
        return choice, None
    if n % len(classes):
        raise ValueError(f"--n {n}: --class gives {len(classes)} classes, one grid row each, so --n must be a multiple "
                         f"of {len(classes)}")
    return torch.tensor(classes).repeat_interleave(n // len(classes)), n // len(classes)


def _vae_samples(args: argparse.Namespace, device: Any) -> tuple[Iterator[Any], int | None]:
    """uint8 images from a VAE's own prior (`model.sample`; of the --class classes for a class-conditional one),
    `--batch-size` at a time, and the grid's row length; batch j is drawn with the seed keyed by (--seed, j), so a
    seed's images depend on the batch size, as a prior's do. The model is loaded and checked before the first batch
    is asked for."""
    import torch

    from vqtok.seeds import keyed_seed

    model = _load_image_model(args.model, map_location=device)
    if not model.is_gaussian:
        raise ValueError(f"{args.model} is a VQ tokenizer, which has no prior of its own: sample codes with a "
                         "transformer prior (--prior)")
    labels, nrow = _class_labels(args.label, args.n, getattr(model.config, "num_classes", 0), args.model)
    model.eval()

    def batches() -> Iterator[Any]:
        for j, start in enumerate(range(0, args.n, args.batch_size)):
            count = min(args.batch_size, args.n - start)
            given = {} if labels is None else {"labels": _rows(labels, start, count)}
            with torch.inference_mode():
                yield model.postprocess(model.sample(count, temperature=args.temperature, seed=keyed_seed(args.seed, j),
                                                     **given))

    return batches(), nrow


def _rows(labels: Any, start: int, count: int) -> Any:
    """Labels of items start .. start + count - 1: a slice of per-item labels, or the one label of all."""
    return labels[start : start + count] if getattr(labels, "ndim", 0) else labels


def _write_samples(batches: Iterator[Any], tokenizer: Any, shape: tuple[int, ...], out: Path, codes_path: Path | None,
                   images_dir: Path | None, *, nrow: int | None = None, **labels: Any) -> None:
    """Decode and write each batch of codes as it comes: its codes appended to the .npy file (renamed into place
    once complete), its images written by `_write_images`. `labels`: a conditional tokenizer's `labels=` for all n
    codes (see `_decode_images`)."""
    import numpy as np

    with ExitStack() as stack:
        codes_file = stack.enter_context(_npy_rows(codes_path, shape, np.int64)) if codes_path else None

        def decoded() -> Iterator[Any]:
            start = 0
            for codes in batches:
                if codes_file is not None:
                    codes_file.write(codes.cpu().numpy())
                yield _decode_images(tokenizer, codes, **{k: _rows(v, start, len(codes)) for k, v in labels.items()})
                start += len(codes)

        _write_images(decoded(), out, images_dir, total=shape[0], nrow=nrow)


def _write_images(batches: Iterator[Any], out: Path, images_dir: Path | None, total: int,
                  nrow: int | None = None) -> None:
    """Write each batch of uint8 images as it comes: as PNG files into `images_dir`, the first MAX_GRID_IMAGES kept
    for the grid `out` (rows of `nrow`; None: about square), written last. A progress bar (stderr) counts the
    `total` images as they are sampled."""
    import torch
    from tqdm.auto import tqdm

    shown: list[torch.Tensor] = []
    done = 0
    with tqdm(total=total, unit="img", desc="sample") as bar:
        for images in batches:
            if done < MAX_GRID_IMAGES:
                shown.append(images[: MAX_GRID_IMAGES - done].cpu())
            if images_dir is not None:
                _write_pngs(images, images_dir, first=done)
            done += len(images)
            bar.update(len(images))
    _save_grid(torch.cat(shown), out, nrow)


def _eval(args: argparse.Namespace) -> int:
    from vqtok.files import write_text_atomically
    from vqtok.nn.perceptual import LPIPS
    from vqtok.train.evaluate import evaluate, format_table

    if args.iwae_batch is not None and args.iwae is None:
        raise ValueError("--iwae-batch sizes the importance-weighted bound's batches: it needs --iwae K")
    out = _output_file(args.out, "--out") if args.out else None
    diagnostics_path = _output_file(args.diagnostics, "--diagnostics", new=True) if args.diagnostics else None
    model = _load_image_model(args.tokenizer)
    perceptual = LPIPS.from_file(args.lpips) if args.lpips else None
    data = parse_data_spec(args.data, args.split, args.limit, offset=args.offset, binarize_seed=args.binarize,
                           skip_unreadable=args.skip_unreadable)
    with _skip_flag_hint():
        dataset = _model_dataset(model, data)
        bound = {} if args.iwae is None else {"iwae": args.iwae}
        if args.iwae_batch is not None:
            bound["iwae_batch"] = args.iwae_batch
        collected = _diagnostics_collector(model) if diagnostics_path else {}
        metrics = evaluate(model, dataset, batch_size=args.batch_size, perceptual=perceptual, progress=True, **bound,
                           **collected)
    print(format_table(metrics))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out, json.dumps(metrics, indent=2) + "\n")
    if diagnostics_path:
        report = _diagnostics_report(model, args, metrics, *collected.values())
        diagnostics_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(diagnostics_path, json.dumps(report) + "\n")
        print(f"wrote the per-element diagnostics to {diagnostics_path}")
    return 0


def _score(args: argparse.Namespace) -> int:
    """Score --data (and --reference-data) image by image; write the CSV (and the histograms), print each score's
    mean per set and, with a reference, its AUROC: lines `auroc  KIND  VALUE` that a person and grep both read."""
    import vqtok
    from vqtok.anomaly import auroc_by_kind, check_scoring, save_histograms, score_images, scores_csv
    from vqtok.data.labels import check_dataset_labels
    from vqtok.files import write_text_atomically

    if args.histogram is not None and args.reference_data is None:
        raise ValueError("--histogram draws the scores of both sets: it needs --reference-data")
    out = _output_file(args.out, "--out", new=True)
    histogram = None
    if args.reference_data is not None:
        histogram = _output_file(args.histogram or str(out.with_name(f"{out.stem}_histogram.png")), "--histogram",
                                 image=True, new=True)
        if histogram.resolve() == out.resolve():
            raise ValueError(f"--histogram {histogram}: the same file as --out")
    device = _device(args.device)
    model = _load_image_model(args.tokenizer, map_location=device)
    prior = None
    if args.prior is not None:
        prior = vqtok.load(args.prior, map_location=device)
        if not isinstance(prior, vqtok.TransformerPrior):
            raise ValueError(f"{args.prior} holds a {prior.model_type}, not a transformer prior")
    check_scoring(model, prior=prior, iwae=args.iwae)  # before any image is read
    if args.dataset_labels and not getattr(model.config, "num_classes", 0):
        raise ValueError(f"--dataset-labels: {args.tokenizer} is not a class-conditional model")
    specs = {"data": args.data, **({"reference": args.reference_data} if args.reference_data else {})}
    sets = {}
    with _skip_flag_hint():
        datasets = {name: _model_dataset(model, parse_data_spec(spec, args.split, args.limit, offset=args.offset,
                                                                binarize_seed=args.binarize,
                                                                skip_unreadable=args.skip_unreadable))
                    for name, spec in specs.items()}
        if args.dataset_labels:  # every image of both sets has a label, checked before any is scored
            for name, dataset in datasets.items():
                check_dataset_labels(dataset, model.config.num_classes,
                                     "--data" if name == "data" else "--reference-data")
        for name, dataset in datasets.items():
            sets[name] = score_images(model, dataset, prior=prior, iwae=args.iwae,
                                      labels=dataset.labels if args.dataset_labels else None,
                                      batch_size=args.batch_size, progress=True, desc=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, scores_csv(sets, index_offset=args.offset))
    kinds = list(sets["data"].scores)
    width = max(len(k) for k in kinds)
    print(f"images {'  '.join(f'{name} {len(s)}' for name, s in sets.items())}")
    for kind in kinds:
        means = "  ".join(f"{name} {float(s.scores[kind].mean()):.6g}" for name, s in sets.items())
        print(f"mean   {kind:<{width}}  {means}")
    written = [f"{out} ({sum(len(s) for s in sets.values())} rows)"]
    if histogram is not None:
        aurocs = auroc_by_kind(sets["reference"], sets["data"])
        print("# auroc: the probability that a --data image scores as more anomalous than a --reference-data image "
              "(1: separated, 0.5: chance, below 0.5: the data look MORE typical); psnr's is that of -psnr")
        for kind, value in aurocs.items():
            print(f"auroc  {kind:<{width}}  {value:.4f}")
        save_histograms({"reference": sets["reference"], "data": sets["data"]}, histogram, aurocs=aurocs)
        written.append(str(histogram))
    print(f"wrote {', '.join(written)}")
    return 0


def _diagnostics_collector(model: Any) -> dict[str, Any]:
    """evaluate()'s keyword that keeps the per-element statistics: a VAE's latents, or a VQ tokenizer's codes."""
    from vqtok.diagnostics import CodeCounts, LatentStatistics

    if model.kl_objective is not None:
        return {"latents": LatentStatistics()}
    return {"codes": CodeCounts(model.vocab_size, model.bottleneck.code_depth)}


def _diagnostics_report(model: Any, args: argparse.Namespace, metrics: dict[str, Any],
                        collected: Any) -> dict[str, Any]:
    """What `vqtok eval --diagnostics` writes: what was evaluated, the metrics, and the per-element arrays."""
    import vqtok

    report: dict[str, Any] = {"tokenizer": args.tokenizer, "data": args.data, "split": args.split,
                              "offset": args.offset, "limit": args.limit, "metrics": metrics}
    if isinstance(model, vqtok.HierarchicalVAE):
        report["kl_against"] = ("each group's learned prior p(z_l | z_<l), with the groups above at their posterior "
                                "means")
    elif model.kl_objective is not None:
        report["kl_against"] = "the prior N(0, 1) of every element"
    return {**report, **collected.to_dict()}


def _traverse(args: argparse.Namespace) -> int:
    from vqtok.diagnostics import latent_statistics
    from vqtok.latents.traversal import check_traversable, save_traversal_grid, traverse

    data_options = {"--split": args.split, "--limit": args.limit, "--batch-size": args.batch_size}
    given = [flag for flag, value in data_options.items() if value is not None]
    if given and args.data is None:
        raise ValueError(f"{', '.join(given)}: for reading --data, whose KL orders the rows; give --data")
    out = _output_file(args.out, "--out", image=True, new=True)
    model = _load_image_model(args.tokenizer)
    check_traversable(model)
    label = _class_label(model, args.label, args.tokenizer, "--class")
    x = _read_images(model, [args.image])
    statistics = None
    if args.data is not None:
        data = parse_data_spec(args.data, args.split or "test", args.limit)
        with _skip_flag_hint():
            dataset = _model_dataset(model, data)
            statistics = latent_statistics(model, dataset, batch_size=args.batch_size or 64, progress=True)
    traversal = traverse(model, x, statistics=statistics, dims=args.dims, steps=args.steps, span=args.span,
                         labels=label)
    save_traversal_grid(model, traversal, out)
    ordered_by = f"their average KL over {statistics.count} images of {args.data}" if statistics else "this image's KL"
    print(traversal.legend())
    print(f"wrote {out}: {len(traversal.elements)} rows (elements ordered by {ordered_by}) x {args.steps} columns "
          f"({-args.span:g} .. {args.span:g} prior standard deviations)")
    return 0


def _load_image_model(name: str, *, autoencoder_only: bool = False, **load_kwargs: Any):
    """A model of images: an autoencoder (VQ or Gaussian) or a hierarchical VAE (`autoencoder_only`: the former)."""
    import vqtok

    model = vqtok.load(name, **load_kwargs)
    kinds = (vqtok.Autoencoder,) if autoencoder_only else (vqtok.Autoencoder, vqtok.HierarchicalVAE)
    if not isinstance(model, kinds):
        wanted = "an autoencoder" if autoencoder_only else "an autoencoder or a hierarchical VAE"
        raise ValueError(f"{name} holds a {model.model_type}, not a tokenizer ({wanted})")
    return model


def _encode(args: argparse.Namespace) -> int:
    from vqtok.data.token_store import encode_dataset

    data = parse_data_spec(args.data, args.split, args.limit, offset=args.offset, binarize_seed=args.binarize,
                           skip_unreadable=args.skip_unreadable)
    augmentations = ("none", "hflip") if args.hflip else ("none",)
    with _skip_flag_hint():
        out = encode_dataset(args.tokenizer, data, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                             augmentations=augmentations, num_workers=args.num_workers, compile=args.compile,
                             precision=args.precision)
    print(f"token store written to {out}")
    return 0


def _decode(args: argparse.Namespace) -> int:
    import vqtok
    from vqtok.data.token_store import TokenDataset

    path = Path(args.codes)
    out = _output_file(args.out, "--out", image=True)
    if path.is_dir():
        store = TokenDataset(path)
        if len(store) == 0:
            raise ValueError(f"{path}: the token store holds no images")
        tokenizer = _load_image_model(args.tokenizer) if args.tokenizer else store.load_tokenizer()
        store.check_tokenizer(tokenizer)
        step = len(store.augmentations)
        codes, labels = store.gather(range(0, min(args.n * step, len(store)), step))  # the un-augmented views
        given = {"labels": labels} if getattr(tokenizer.config, "num_classes", 0) else {}  # the store's labels
    else:
        if not path.is_file():
            raise FileNotFoundError(f"no token store folder or .npy file {path}")
        if not args.tokenizer:
            raise ValueError("decoding a .npy file of codes needs --tokenizer")
        tokenizer = _load_image_model(args.tokenizer)
        if isinstance(tokenizer, vqtok.HierarchicalVAE):
            raise ValueError(f"{path}: a .npy file holds one grid, but {args.tokenizer} is a hierarchical VAE "
                             "(latents in groups): decode its token store folder instead")
        codes, given = _read_codes(path, tokenizer, args.n), {}  # no labels: a conditional tokenizer's null label
    images = _decode_images(tokenizer, codes, **given)
    _save_grid(images, out)
    print(f"wrote {len(images)} decoded images to {out}")
    return 0


def _read_codes(path: Path, tokenizer: Any, n: int) -> Any:
    """The first n items of a .npy file, checked against the tokenizer: integer codes [n, h, w] in its vocabulary (VQ;
    a residual VQ's [n, h, w, r], a prefix of its levels), or finite float latents [n, dim, h, w] (Gaussian). A float
    array is never truncated into codes."""
    import numpy as np
    import torch

    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # only the first n items are read
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({' '.join(str(e).split())})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path}: an .npz archive, not a .npy array of codes")
    if tokenizer.is_gaussian:
        dim = tokenizer.bottleneck.dim
        if array.dtype.kind != "f" or array.ndim != 4 or array.shape[1] != dim:
            raise ValueError(f"{path}: a Gaussian tokenizer decodes float latents [n, {dim}, h, w], got {array.dtype} "
                             f"{list(array.shape)}")
    elif array.dtype.kind not in "iu" or array.ndim != 1 + len(tokenizer.code_shape):
        kind = "float values (not codes; they would be truncated)" if array.dtype.kind in "fc" else str(array.dtype)
        axes = "n, h, w" + (", r" if tokenizer.bottleneck.code_depth else "")
        raise ValueError(f"{path}: codes must be integers [{axes}], got {kind} of shape {list(array.shape)}")
    elif (depth := tokenizer.bottleneck.code_depth) and not 1 <= array.shape[-1] <= depth:
        raise ValueError(f"{path}: a residual VQ of {depth} levels decodes codes [n, h, w, r] with 1 <= r <= {depth}, "
                         f"got shape {list(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{path}: holds no codes (shape {list(array.shape)})")
    first = np.array(array[:n])
    if tokenizer.is_gaussian:
        if not np.isfinite(first).all():
            raise ValueError(f"{path}: latents contain NaN or infinite values")
        return torch.from_numpy(first.astype(np.float32))
    low, high, vocab = int(first.min()), int(first.max()), tokenizer.vocab_size
    if low < 0 or high >= vocab:
        raise ValueError(f"{path}: codes must lie in [0, {vocab}) for this tokenizer, got values in [{low}, {high}]")
    return torch.from_numpy(first.astype(np.int64))


def _decode_images(tokenizer: Any, codes: Any, **labels: Any) -> Any:
    """uint8 images [n, C, H, W] of codes (or a Gaussian tokenizer's latents, or a tuple of a hierarchical VAE's
    latents of every group), decoded DECODE_BATCH at a time; `labels=` (a class-conditional tokenizer's: one for all,
    [n], or None for its null label) is passed on to `decode`."""
    import torch

    device = next(tokenizer.parameters()).device

    def placed(chunk: torch.Tensor) -> torch.Tensor:
        return chunk.to(device, torch.float32) if tokenizer.is_gaussian else chunk.to(device)

    def decoded(chunk: torch.Tensor | tuple[torch.Tensor, ...], start: int) -> torch.Tensor:
        latents = [placed(group) for group in chunk] if isinstance(chunk, tuple) else placed(chunk)
        given = {k: _rows(v, start, DECODE_BATCH) for k, v in labels.items()}
        return tokenizer.postprocess(tokenizer.decode(latents, **given))

    # a tuple holds one tensor per group: each chunk is every group's rows, decoded from a list
    chunks = zip(*(c.split(DECODE_BATCH) for c in codes)) if isinstance(codes, tuple) else codes.split(DECODE_BATCH)
    with torch.inference_mode():
        return torch.cat([decoded(chunk, i * DECODE_BATCH) for i, chunk in enumerate(chunks)])


def _interpolate(args: argparse.Namespace) -> int:
    """A one-row strip: input A, the decoded steps from A's latents to B's, input B (see vqtok.latents)."""
    import torch

    from vqtok.latents import default_method, interpolate
    from vqtok.train.evaluate import save_image_grid

    if args.steps < 2:
        raise ValueError(f"--steps {args.steps}: at least 2 (the latents of A and of B)")
    out = _output_file(args.out, "--out", image=True, new=True)
    model = _load_image_model(args.tokenizer, map_location=_device(args.device))
    label = _class_label(model, args.label, args.tokenizer)
    a, b = _read_images(model, [args.a, args.b]).split(1)
    method = args.method or default_method(model)
    steps = interpolate(model, a, b, args.steps, method=method, labels=label)[0]
    strip = model.postprocess(torch.cat([a, steps, b]))
    save_image_grid(strip.cpu(), out, nrow=len(strip))
    quantized = " (each quantized to codes)" if getattr(model, "vocab_size", None) else ""
    print(f"wrote {out}: input A, {args.steps} {method} steps{quantized}, input B")
    return 0


def _arithmetic(args: argparse.Namespace) -> int:
    """A grid: one row per image, its input then the decoded z + s v for each strength s, v the difference of the
    mean latents of --to-class and --from-class in --data (see vqtok.latents)."""
    import torch

    from vqtok.latents import apply_attribute, attribute_vector, class_means
    from vqtok.train.evaluate import save_image_grid

    out = _output_file(args.out, "--out", image=True, new=True)
    if args.apply_limit is not None and args.apply_data is None:
        raise ValueError("--apply-limit counts the images of --apply-data; with --images every file given is a row")
    if args.from_class == args.to_class:
        raise ValueError(f"--from-class and --to-class are both {args.from_class}: the attribute vector would be zero")
    rows, columns = len(args.images) if args.images else args.apply_limit or ARITHMETIC_ROWS, len(args.strengths) + 1
    if rows * columns > MAX_GRID_IMAGES:
        raise ValueError(f"{rows} images x ({len(args.strengths)} strengths + the input) = {rows * columns} tiles: "
                         f"a grid shows at most {MAX_GRID_IMAGES}")
    model = _load_image_model(args.tokenizer, map_location=_device(args.device))
    with _skip_flag_hint():
        x = _read_images(model, args.images) if args.images else _first_images(model, args.apply_data, args, rows)
        data = parse_data_spec(args.data, args.split, skip_unreadable=args.skip_unreadable)
        means = class_means(model, _model_dataset(model, data), [args.from_class, args.to_class], limit=args.limit,
                            batch_size=args.batch_size)
    vector = attribute_vector(means, args.from_class, args.to_class)
    moved = torch.cat([apply_attribute(model, part, vector, args.strengths) for part in x.split(args.batch_size)])
    grid = torch.cat([x[:, None], moved], dim=1).flatten(0, 1)  # row by row: the input, then each strength
    save_image_grid(model.postprocess(grid).cpu(), out, nrow=columns)
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in vector))
    counts = means.counts
    print(f"attribute vector: mean latent of class {args.to_class} ({counts[args.to_class]} images) - class "
          f"{args.from_class}'s ({counts[args.from_class]} images), norm {norm:.4g}")
    print(f"wrote {out}: {len(x)} rows (input, then strengths {', '.join(f'{s:g}' for s in args.strengths)})")
    return 0


def _class_label(model: Any, label: int | None, name: str, flag: str = "--label") -> int | None:
    """A class given on the command line (`flag`) checked against the model: a class of a class-conditional model,
    or None."""
    if label is None:
        return None
    classes = getattr(model.config, "num_classes", 0)
    if classes == 0:
        raise ValueError(f"{flag} {label}: {name} is not a class-conditional model")
    if label >= classes:
        raise ValueError(f"{flag} {label}: {name} has classes 0 to {classes - 1}")
    return label


def _read_images(model: Any, paths: list[str]) -> Any:
    """Image files (PIL) as one batch in the model's range, preprocessed as the model does; a file that cannot be
    read or preprocessed, or images of different sizes after preprocessing, are errors naming the file(s)."""
    import torch

    from vqtok.data.sources import SKIP_HINT, UnreadableImageError, _open_image

    batch = []
    for path in paths:
        try:
            image = _open_image(Path(path))
        except UnreadableImageError as e:
            raise UnreadableImageError(str(e).replace(f" ({SKIP_HINT})", "")) from None
        try:
            batch.append(model.preprocess(image))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    sizes = {f"{x.shape[-2]}x{x.shape[-1]}": path for x, path in zip(batch, paths)}
    if len(sizes) > 1:
        named = ", ".join(f"{path} is {size}" for size, path in sizes.items())
        raise ValueError(f"the images differ in size after preprocessing ({named}); give images of one size, or a "
                         "model whose preprocess resizes and crops")
    return torch.cat(batch)


def _first_images(model: Any, spec: str, args: argparse.Namespace, n: int) -> Any:
    """The first n images of a data spec as one batch in the model's range, on its device."""
    import torch

    from vqtok.images import uint8_to_range

    data = parse_data_spec(spec, args.split, n, skip_unreadable=args.skip_unreadable)
    dataset = _model_dataset(model, data)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return uint8_to_range(images, model.config.value_range).to(next(model.parameters()).device)


def _model_dataset(model: Any, data: Any) -> Any:
    """The images of a DataConfig preprocessed as `model.preprocess` does (any size that it encodes)."""
    from vqtok.data import build_dataset

    c = model.config
    return build_dataset(data, channels=c.in_channels, preprocess=c.preprocess, size=None,
                         multiple=model.size_multiple())


def _push(args: argparse.Namespace) -> int:
    from huggingface_hub import CommitOperationAdd, HfApi

    import vqtok
    from vqtok.hub import publication

    model = vqtok.load(args.folder)  # refuse to publish what would not load
    if isinstance(model, vqtok.TransformerPrior):  # ... or a prior whose tokenizer is missing or not the recorded one
        model.attach_tokenizer(model.load_tokenizer())
    publication(model, args.folder, args.repo_id, license=args.license)  # (its errors before a repo is made)
    api = HfApi()
    repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
    files, notes = publication(model, args.folder, repo_id, license=args.license)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=what) for name, what in files.items()]
    url = api.create_commit(repo_id=repo_id, operations=operations, commit_message=args.message,
                            revision=args.branch)
    for note in notes:
        print(note)
    print(f"pushed {args.folder} to {getattr(url, 'commit_url', url)} ({', '.join(files)})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from vqtok.files import staged_folder
    from vqtok.pretrained import convert

    out = _output_folder(args.out, "OUT")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"OUT {out}: exists and is not empty; vqtok convert writes a new folder")
    options = _conversion_options(args)
    model = convert(options.pop("source"), license=args.license, **options)
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp)
    origin = model.config.converted_from
    what = f"{origin.format}, {origin.class_name}" if origin.class_name else origin.format
    print(f"converted {origin.source} ({what}) to {out}")
    for line in _summary(model.config, sum(p.numel() for p in model.parameters())):
        print(f"  {line}")
    print(f"next: vqtok info {out} / vqtok encode {out} --data ... / vqtok push {out} ORG/NAME")
    return 0


def _convert_lpips(args: argparse.Namespace) -> int:
    from vqtok.nn.perceptual import convert_lpips_weights

    count = convert_lpips_weights(args.vgg, args.out, heads=args.heads)
    print(f"wrote {args.out} ({count} tensors); use it as a config's perceptual.weights or vqtok eval --lpips")
    return 0


def _summary(config: Any, parameters: int) -> list[str]:
    """What an image tokenizer's config means for its users: the bottleneck, latent shapes, the vocabulary."""
    f, b = config.downsampling_factor, config.bottleneck
    sizes = sorted({config.resolution, 256, 512} - {s for s in (256, 512) if s % f})
    if b.kind == "vq":
        kind = f"VQ, {b.codebook_size:,} codes of dim {b.dim}{' (l2-normalised)' if b.l2_normalize else ''}"
        shapes = ", ".join(f"{s}x{s} -> {s // f}x{s // f} codes" for s in sizes)
    elif b.kind == "rvq":
        kind = (f"residual VQ, {b.depth} levels of {b.codebook_size:,} codes of dim {b.dim}"
                + (f", quantizer dropout {b.quantizer_dropout}" if b.quantizer_dropout else ""))
        shapes = ", ".join(f"{s}x{s} -> {s // f}x{s // f}x{b.depth} codes" for s in sizes)
    elif b.kind == "fsq":
        kind = f"FSQ, levels {list(b.levels)}: {b.vocab_size:,} codes of dim {b.dim}"
        shapes = ", ".join(f"{s}x{s} -> {s // f}x{s // f} codes" for s in sizes)
    elif b.kind == "lfq":
        kind = (f"{'BSQ' if b.spherical else 'LFQ'}, {b.bits} bits: {b.vocab_size:,} codes of dim {b.dim}"
                f"{' (on the unit sphere)' if b.spherical else ''}")
        shapes = ", ".join(f"{s}x{s} -> {s // f}x{s // f} codes" for s in sizes)
    else:
        kind = f"Gaussian (KL), {b.dim} latent channels"
        shapes = ", ".join(f"{s}x{s} -> {b.dim}x{s // f}x{s // f}" for s in sizes)
    lines = [f"bottleneck: {kind}", f"downsampling factor {f}: {shapes}", f"parameters: {parameters:,}"]
    if config.scaling_factor != 1.0 or config.shift_factor != 0.0:
        lines.append(f"latent scaling: (z - {config.shift_factor}) * {config.scaling_factor} "
                     "(scale_latents; not applied by encode)")
    if config.force_upcast:
        lines.append("force_upcast: runs in float32 under autocast")
    return lines


def _info(args: argparse.Namespace) -> int:
    import vqtok
    from vqtok.pretrained import plan

    options = _conversion_options(args)
    if _is_vqtok_model(options["source"], options["revision"], options["subfolder"]):
        return _info_vqtok(vqtok.load(args.source, subfolder=args.subfolder))
    conversion = plan(options.pop("source"), shapes_only=True, **options)
    origin, c = conversion.config.converted_from, conversion.config
    print(f"{origin.source}: a {origin.format} {origin.class_name or 'checkpoint'}"
          f"{' at ' + origin.revision if origin.revision else ''}; vqtok loads it as an autoencoder")
    used = sum(t.numel() for name, t in conversion.located.checkpoint.tensors.items()
               if conversion.layout.why_ignored(name) is None)
    for line in _summary(c, used):
        print(f"  {line}")
    print(f"  architecture: base_channels {c.base_channels}, channel_mult {list(c.channel_mult)}, num_res_blocks "
          f"{c.num_res_blocks}, attention at {list(c.attn_resolutions) or 'no level'} (resolution {c.resolution})"
          f"{', mid' if c.mid_attention else ''}; latent_channels {c.latent_channels}, norm_groups {c.norm_groups}")
    for name, reason in conversion.set_aside.items():
        print(f"  not loaded: {name}: {reason}")
    if origin.license:
        print(f"  license: {origin.license}")
    return 0


def _is_vqtok_model(source: str, revision: str | None, subfolder: str | None) -> bool:
    """Whether `source` is a vqtok model (config.json with model_type) rather than a convertible checkpoint."""
    from vqtok.hub import CONFIG_NAME, _read_config_json, _resolve

    if os.path.isfile(source):
        return False
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return "model_type" in _read_config_json(_resolve(source, prefix + CONFIG_NAME, revision=revision))


def _info_vqtok(model: Any) -> int:
    print(json.dumps(model.config_dict(), indent=2))
    from vqtok.train.evaluate import codebook_health, codebook_warnings

    stats = getattr(getattr(model, "bottleneck", None), "codebook_stats", None)
    if stats is not None:
        health = codebook_health(model)
        print(json.dumps({**{k: v.item() for k, v in stats().items()}, "initialized": health["codebook_initialized"]},
                         indent=2))
        for warning in codebook_warnings(health, model.config.bottleneck):
            print(f"warning: {warning}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Outputs, devices and errors


def _output_file(path: str, flag: str, *, image: bool = False, new: bool = False) -> Path:
    """Check an output file's place before any work is done: not a folder, under folders (or nothing yet), and for
    an image a suffix PIL can write; with `new`, not an existing file (refused, never replaced). Missing folders are
    made when the file is written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    if new and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{flag} {path}: exists; remove it or choose another name (it is never replaced)")
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(f"{flag} {path}: {ancestor} is a file, not a folder")
            break
    if image:
        from PIL import Image

        if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
            raise ValueError(f"{flag} {path}: not an image file name (use .png)")
    return path


def _output_folder(path: str, flag: str) -> Path:
    """Check an output folder's place before any work: a folder or nothing yet, under folders."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a folder")
    _output_file(path / "x", flag)
    return path


def _check_free_space(path: Path, size: int, flag: str) -> None:
    import shutil

    place = next(p for p in [path.parent, *path.parents] if p.exists())
    free = shutil.disk_usage(place).free
    if size > free:
        raise ValueError(f"{flag} {path}: needs {size / 2**30:,.2f} GiB, only {free / 2**30:,.2f} GiB are free there")


class _Rows:
    """Rows appended to an open .npy file whose header promised `shape`."""

    def __init__(self, file: BinaryIO, shape: tuple[int, ...], dtype: Any):
        self.file, self.shape, self.dtype, self.rows = file, shape, dtype, 0

    def write(self, rows: Any) -> None:
        import numpy as np

        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if tuple(rows.shape[1:]) != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"rows of shape {rows.shape} do not fit a .npy array of shape {self.shape}")
        self.file.write(rows.tobytes())
        self.rows += len(rows)


@contextmanager
def _npy_rows(path: Path, shape: tuple[int, ...], dtype: Any) -> Iterator[_Rows]:
    """A .npy file of `shape` written row block by row block (never held whole), renamed into place only when every
    row was written (`staged`)."""
    import numpy as np

    from vqtok.files import staged

    path.parent.mkdir(parents=True, exist_ok=True)
    with staged(path) as tmp, open(tmp, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        rows = _Rows(f, shape, dtype)
        yield rows
        if rows.rows != shape[0]:
            raise RuntimeError(f"{path}: {rows.rows} of {shape[0]} rows written")


def _write_pngs(images: Any, folder: Path, first: int) -> None:
    """uint8 images as folder/NNNNN.png from index `first`, each written whole or not at all."""
    from vqtok.files import staged
    from vqtok.images import to_pil

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(to_pil(images.cpu()), start=first):
        with staged(folder / f"{i:05d}.png") as tmp:
            image.save(tmp, format="PNG")


def _save_grid(images: Any, out: Path, nrow: int | None = None) -> None:
    from vqtok.train.evaluate import save_image_grid

    save_image_grid(images.cpu(), out, nrow=nrow)


def _device(name: str | None) -> Any:
    """--device as a torch.device that exists here (default: cuda when available, else cpu)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (no GPU, or torch was built without it)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: vqtok runs on cpu, cuda or mps")
    return device


USER_ERRORS = (ValueError, OSError, ImportError)
"""Errors whose message is written for the user (ConfigError, the data and store errors are ValueErrors; missing
files are OSErrors): shown as they are. Any other error is shown with its type and a hint at --debug."""


def describe_error(error: BaseException) -> str:
    """One line naming the problem: an OSError's reason and file, otherwise the message, whitespace collapsed."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        message = f"{error.strerror}: {error.filename}"
    elif isinstance(error, OSError) and error.strerror:
        message = error.strerror
    else:
        message = _from_worker(str(error))
    message = " ".join(message.split()) or type(error).__name__
    if not isinstance(error, USER_ERRORS):
        message = f"{type(error).__name__}: {message} (--debug shows the traceback)"
    return message


def _from_worker(message: str) -> str:
    """The original error's line of an error re-raised from a DataLoader worker, whose message holds the worker's
    whole traceback ("Caught X in DataLoader worker process 0. Original Traceback ... module.X: message")."""
    if "Original Traceback (most recent call last):" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    kind, sep, text = last.partition(": ")
    return f"{text if sep and ' ' not in kind else last} (in a data loader worker)"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status. Whatever goes wrong, the last line on stderr is one line naming
    the problem: `vqtok COMMAND: error: ...` (status 1; with --debug, after the traceback), argparse's own for bad
    arguments (status 2), or `vqtok COMMAND: interrupted` on Ctrl-C (status 130; a training run stopped by Ctrl-C or
    SIGTERM says which checkpoint it saved, status 130 or 143)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse has already reported
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        return args.run(args)
    except KeyboardInterrupt as e:
        _end_progress_bars()
        if args.debug:
            traceback.print_exc()
        return _interrupted(args.command, e)
    except Exception as e:
        _end_progress_bars()
        if args.debug:
            traceback.print_exc()
        print(f"vqtok {args.command}: error: {describe_error(e)}", file=sys.stderr)
        return 1


def _interrupted(command: str, error: KeyboardInterrupt) -> int:
    """One line for Ctrl-C or SIGTERM; returns the exit status, 128 + the signal's number. A training run stopped
    between steps says which checkpoint it saved (`TrainingInterrupted`)."""
    from vqtok.train.run_folder import TrainingInterrupted

    if isinstance(error, TrainingInterrupted):
        print(f"vqtok {command}: {error}", file=sys.stderr)
        return error.exit_code
    print(f"vqtok {command}: interrupted", file=sys.stderr)
    return 130


def _end_progress_bars() -> None:
    """Close the progress bars an error left open, so that the error's line starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
