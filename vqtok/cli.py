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

    quickstart = commands.add_parser("quickstart", help="train a small VQ tokenizer on the built-in digits")
    quickstart.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    quickstart.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    quickstart.set_defaults(run=_quickstart)

    train = commands.add_parser("train", help="train a tokenizer from a YAML config")
    train.add_argument("config", help="YAML file (a TrainConfig)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set max_steps=100 --set model.bottleneck.beta=0.5")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                       help="stop after STEP with a checkpoint (resume later with --resume)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="PSNR, SSIM and codebook usage of a tokenizer on a dataset")
    evaluate.add_argument("tokenizer", help="local folder or Hub repo id[@revision]")
    evaluate.add_argument("--data", required=True, help="digits | folder:PATH | idx:IMAGES[,LABELS] | torchvision:NAME:ROOT")
    evaluate.add_argument("--split", choices=["train", "test"], default="test")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--out", default=None, help="also write the metrics as JSON here")
    evaluate.set_defaults(run=_eval)

    encode = commands.add_parser("encode", help="encode a dataset into a token store (resumable, multi-process)")
    encode.add_argument("--tokenizer", required=True, help="local folder or Hub repo id[@revision]")
    encode.add_argument("--data", required=True, help="digits | folder:PATH | idx:IMAGES[,LABELS] | torchvision:NAME:ROOT")
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


def parse_data_spec(spec: str, split: str = "train", limit: int | None = None):
    """'digits' | 'folder:PATH' | 'idx:IMAGES[,LABELS]' | 'torchvision:NAME:ROOT' -> DataConfig."""
    from vqtok.config import ConfigError, DataConfig

    kind, _, rest = spec.partition(":")
    if kind == "digits" and not rest:
        return DataConfig(source="digits", split=split, limit=limit)
    if kind == "folder" and rest:
        return DataConfig(source="folder", path=rest, split=split, limit=limit)
    if kind == "idx" and rest:
        images, _, labels = rest.partition(",")
        return DataConfig(source="idx", path=images, labels=labels or None, split=split, limit=limit)
    if kind == "torchvision" and ":" in rest:
        name, _, root = rest.partition(":")
        return DataConfig(source="torchvision", name=name, path=root, split=split, limit=limit)
    raise ConfigError(f"--data {spec!r}: expected digits, folder:PATH, idx:IMAGES[,LABELS] or torchvision:NAME:ROOT")


def _quickstart(args: argparse.Namespace) -> int:
    from vqtok.train.quickstart import quickstart

    return quickstart(args.out, args.steps)


def _train(args: argparse.Namespace) -> int:
    from vqtok.config import TrainConfig, load_yaml
    from vqtok.train import train

    config = load_yaml(args.config, TrainConfig, overrides=args.set)
    folder = train(config, resume=args.resume, stop_at=args.stop_at)
    print(f"tokenizer saved to {folder}" if folder else f"stopped at step {args.stop_at}; continue with --resume")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import vqtok
    from vqtok.data import build_dataset
    from vqtok.train.evaluate import evaluate, format_table

    model = vqtok.load(args.tokenizer)
    c = model.config
    dataset = build_dataset(parse_data_spec(args.data, args.split, args.limit), channels=c.in_channels,
                            preprocess=c.preprocess, size=None)
    metrics = evaluate(model, dataset, batch_size=args.batch_size)
    print(format_table(metrics))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


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

    import vqtok
    from vqtok.data.token_store import TokenDataset
    from vqtok.train.evaluate import save_image_grid

    path = Path(args.codes)
    if path.is_dir():
        store = TokenDataset(path)
        tokenizer = vqtok.load(args.tokenizer) if args.tokenizer else store.load_tokenizer()
        store.check_tokenizer(tokenizer)
        step = len(store.augmentations)
        codes = torch.stack([store[i][0] for i in range(0, min(args.n * step, len(store)), step)])
    else:
        if not args.tokenizer:
            raise ValueError("decoding a .npy file of codes needs --tokenizer")
        tokenizer = vqtok.load(args.tokenizer)
        codes = torch.from_numpy(np.load(path, allow_pickle=False)[: args.n]).long()
    images = tokenizer.postprocess(tokenizer.decode(codes.to(torch.float32) if tokenizer.is_gaussian else codes))
    save_image_grid(images, args.out)
    print(f"wrote {len(images)} decoded images to {args.out}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi

    import vqtok

    vqtok.load(args.folder)  # refuse to publish what would not load
    api = HfApi()
    repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
    url = api.upload_folder(repo_id=repo_id, folder_path=args.folder, revision=args.branch,
                            commit_message=args.message, allow_patterns=["config.json", "model.safetensors", "README.md", "*.safetensors"])
    print(f"pushed {args.folder} to {url}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import vqtok

    model = vqtok.load(args.model)
    print(json.dumps(model.config_dict(), indent=2))
    stats = getattr(model.bottleneck, "codebook_stats", None)
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
