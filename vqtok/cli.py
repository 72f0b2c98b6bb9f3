"""The `vqtok` command (also `python -m vqtok`, and `accelerate launch -m vqtok ...` for several processes)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from vqtok.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqtok", description="Image tokenizers for generative transformers.")
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
    train_prior.set_defaults(run=_train_prior)

    sample = commands.add_parser("sample", help="sample codes from a prior and decode them into images")
    sample.add_argument("--prior", required=True, help="the prior: local folder or Hub repo id[@revision]")
    sample.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    sample.add_argument("--class", dest="label", type=int, default=None,
                        help="class of every sample (conditional priors; default: unconditional)")
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--top-p", type=float, default=None)
    sample.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (needs --class)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=None, help="samples generated at once (default: all)")
    sample.add_argument("--tokenizer", default=None,
                        help="decode with this tokenizer instead of the recorded one (it must be the same weights)")
    sample.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    sample.add_argument("--out", required=True, help="PNG grid to write")
    sample.add_argument("--images-dir", default=None, help="also write each image as a PNG into this folder")
    sample.add_argument("--codes", default=None, help="also write the sampled codes [n, h, w] to this .npy file")
    sample.set_defaults(run=_sample)

    evaluate = commands.add_parser("eval", help="PSNR, SSIM and codebook usage of a tokenizer on a dataset")
    evaluate.add_argument("tokenizer", help="local folder or Hub repo id[@revision]")
    evaluate.add_argument("--data", required=True, help="digits | folder:PATH | idx:IMAGES[,LABELS] | amat:PATH | torchvision:NAME:ROOT")
    evaluate.add_argument("--split", choices=["train", "test"], default="test")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--out", default=None, help="also write the metrics as JSON here")
    evaluate.add_argument("--lpips", default=None, metavar="WEIGHTS",
                          help="also report LPIPS, with these LPIPS-VGG16 weights (scripts/convert_lpips_weights.py)")
    evaluate.set_defaults(run=_eval)

    encode = commands.add_parser("encode", help="encode a dataset into a token store (resumable, multi-process)")
    encode.add_argument("--tokenizer", required=True, help="local folder or Hub repo id[@revision]")
    encode.add_argument("--data", required=True, help="digits | folder:PATH | idx:IMAGES[,LABELS] | amat:PATH | torchvision:NAME:ROOT")
    encode.add_argument("--split", choices=["train", "test"], default="train")
    encode.add_argument("--out", required=True, help="the store folder (re-run with the same arguments to resume)")
    encode.add_argument("--batch-size", type=int, default=256)
    encode.add_argument("--shard-size", type=int, default=10_000)
    encode.add_argument("--hflip", action="store_true", help="also store the codes of horizontally flipped images")
    encode.add_argument("--num-workers", type=int, default=4)
    encode.add_argument("--limit", type=int, default=None, help="encode the first N images only")
    encode.set_defaults(run=_encode)

    decode = commands.add_parser("decode", help="decode stored codes back to images (a PNG grid)")
    decode.add_argument("codes", help="a token store folder, or a .npy file of codes [n, h, w] (needs --tokenizer)")
    decode.add_argument("--out", required=True, help="PNG file to write")
    decode.add_argument("--tokenizer", default=None, help="for a .npy file: the tokenizer folder or Hub id")
    decode.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    decode.set_defaults(run=_decode)

    push = commands.add_parser("push", help="upload a saved model folder to the Hugging Face Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--branch", default=None)
    push.add_argument("--message", default="Upload vqtok model")
    push.set_defaults(run=_push)

    info = commands.add_parser("info", help="print a saved model's config and codebook statistics")
    info.add_argument("model", help="local folder or Hub repo id[@revision]")
    info.set_defaults(run=_info)
    return parser


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


def parse_data_spec(spec: str, split: str = "train", limit: int | None = None):
    """'digits' | 'folder:PATH' | 'idx:IMAGES[,LABELS]' | 'amat:PATH' | 'torchvision:NAME:ROOT' -> DataConfig."""
    from vqtok.config import ConfigError, DataConfig

    kind, _, rest = spec.partition(":")
    if kind == "digits" and not rest:
        return DataConfig(source="digits", split=split, limit=limit)
    if kind == "folder" and rest:
        return DataConfig(source="folder", path=rest, split=split, limit=limit)
    if kind == "idx" and rest:
        images, _, labels = rest.partition(",")
        return DataConfig(source="idx", path=images, labels=labels or None, split=split, limit=limit)
    if kind == "amat" and rest:
        return DataConfig(source="amat", path=rest, split=split, limit=limit)
    if kind == "torchvision" and ":" in rest:
        name, _, root = rest.partition(":")
        return DataConfig(source="torchvision", name=name, path=root, split=split, limit=limit)
    raise ConfigError(f"--data {spec!r}: expected digits, folder:PATH, idx:IMAGES[,LABELS], amat:PATH or torchvision:NAME:ROOT")


def _quickstart(args: argparse.Namespace) -> int:
    from vqtok.train.quickstart import quickstart

    return quickstart(args.out, args.steps, args.prior_steps)


def _train(args: argparse.Namespace) -> int:
    from vqtok.config import TrainConfig, load_yaml
    from vqtok.train import train

    config = load_yaml(args.config, TrainConfig, overrides=args.set)
    try:
        folder = train(config, resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite)
    except KeyboardInterrupt as e:
        return _interrupted("train", e)
    print(f"tokenizer saved to {folder}" if folder else f"stopped at step {args.stop_at}; continue with --resume")
    return 0


def _train_prior(args: argparse.Namespace) -> int:
    from vqtok.config import PriorTrainConfig, load_yaml
    from vqtok.train.prior import train_prior

    config = load_yaml(args.config, PriorTrainConfig, overrides=args.set)
    try:
        folder = train_prior(config, resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite)
    except KeyboardInterrupt as e:
        return _interrupted("train-prior", e)
    print(f"prior saved to {folder}" if folder else f"stopped at step {args.stop_at}; continue with --resume")
    return 0


def _interrupted(command: str, error: KeyboardInterrupt) -> int:
    """A run stopped by Ctrl-C or SIGTERM ends in one line that says whether a checkpoint was saved (no traceback);
    returns the exit code, 128 + the signal's number."""
    from vqtok.train.engine import TrainingInterrupted

    if isinstance(error, TrainingInterrupted):
        print(f"vqtok {command}: {error}", file=sys.stderr)
        return error.exit_code
    print(f"vqtok {command}: interrupted outside the training steps (checkpoints saved before it stay; continue "
          "with --resume)", file=sys.stderr)
    return 130


def _sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import vqtok
    from vqtok.files import staged
    from vqtok.images import to_pil
    from vqtok.train.evaluate import save_image_grid

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prior = vqtok.load(args.prior, map_location=device)
    if not isinstance(prior, vqtok.TransformerPrior):
        raise ValueError(f"{args.prior} holds a {prior.model_type}, not a transformer prior")
    if args.tokenizer:
        prior.attach_tokenizer(_load_tokenizer(args.tokenizer))  # refused unless it is the recorded tokenizer
    tokenizer = prior.tokenizer.to(device)
    codes = prior.generate(args.n, labels=args.label, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size)
    with torch.inference_mode():
        images = torch.cat([tokenizer.postprocess(tokenizer.decode(chunk)) for chunk in codes.split(256)])
    save_image_grid(images, args.out)
    written = [args.out]
    if args.codes:
        with staged(args.codes) as tmp, open(tmp, "wb") as f:
            np.save(f, codes.cpu().numpy(), allow_pickle=False)
        written.append(args.codes)
    if args.images_dir:
        folder = Path(args.images_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(to_pil(images)):
            image.save(folder / f"{i:05d}.png")
        written.append(f"{folder}/ ({len(images)} PNG files)")
    print(f"sampled {args.n} images; wrote " + ", ".join(str(w) for w in written))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vqtok.data import build_dataset
    from vqtok.nn.perceptual import LPIPS
    from vqtok.train.evaluate import evaluate, format_table

    model = _load_tokenizer(args.tokenizer)
    perceptual = LPIPS.from_file(args.lpips) if args.lpips else None
    c = model.config
    dataset = build_dataset(parse_data_spec(args.data, args.split, args.limit), channels=c.in_channels,
                            preprocess=c.preprocess, size=None)
    metrics = evaluate(model, dataset, batch_size=args.batch_size, perceptual=perceptual)
    print(format_table(metrics))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _load_tokenizer(name: str):
    import vqtok

    model = vqtok.load(name)
    if not isinstance(model, vqtok.Autoencoder):
        raise ValueError(f"{name} holds a {model.model_type}, not a tokenizer (autoencoder)")
    return model


def _encode(args: argparse.Namespace) -> int:
    from vqtok.data.token_store import encode_dataset

    data = parse_data_spec(args.data, args.split, args.limit)
    augmentations = ("none", "hflip") if args.hflip else ("none",)
    out = encode_dataset(args.tokenizer, data, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                         augmentations=augmentations, num_workers=args.num_workers)
    print(f"token store written to {out}")
    return 0


def _decode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vqtok.data.token_store import TokenDataset
    from vqtok.train.evaluate import save_image_grid

    path = Path(args.codes)
    if path.is_dir():
        store = TokenDataset(path)
        tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else store.load_tokenizer()
        store.check_tokenizer(tokenizer)
        step = len(store.augmentations)
        codes = torch.stack([store[i][0] for i in range(0, min(args.n * step, len(store)), step)])
    else:
        if not args.tokenizer:
            raise ValueError("decoding a .npy file of codes needs --tokenizer")
        tokenizer = _load_tokenizer(args.tokenizer)
        codes = torch.from_numpy(np.load(path, allow_pickle=False)[: args.n]).long()
    images = tokenizer.postprocess(tokenizer.decode(codes.to(torch.float32) if tokenizer.is_gaussian else codes))
    save_image_grid(images, args.out)
    print(f"wrote {len(images)} decoded images to {args.out}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi

    import vqtok

    model = vqtok.load(args.folder)  # refuse to publish what would not load
    if isinstance(model, vqtok.TransformerPrior):
        model.load_tokenizer()  # ... or a prior whose tokenizer is missing or not the recorded one
    api = HfApi()
    repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
    url = api.upload_folder(repo_id=repo_id, folder_path=args.folder, revision=args.branch,
                            commit_message=args.message, allow_patterns=["config.json", "README.md", "*.safetensors", "tokenizer/config.json", "tokenizer/README.md"])
    print(f"pushed {args.folder} to {url}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import vqtok

    model = vqtok.load(args.model)
    print(json.dumps(model.config_dict(), indent=2))
    stats = getattr(getattr(model, "bottleneck", None), "codebook_stats", None)
    if stats is not None:
        print(json.dumps({k: v.item() for k, v in stats().items()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:  # ConfigError is a ValueError
        print(f"vqtok {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
