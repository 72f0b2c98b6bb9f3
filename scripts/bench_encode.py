"""End-to-end `vqtok encode` throughput against the bare encoder + quantizer, and bytes on disk per image.

* bare: `tokenizer.encode` on uint8 batches already in memory (converted to the model range inside the timed
  loop, as the store does), under `torch.inference_mode`, batch 256: the ceiling for any data pipeline.
* end to end: `vqtok.encode_dataset` from the extracted CIFAR-10 JPEG image folder (listing, decoding in DataLoader
  workers, batching, encoding, writing shards and checksums, the manifest), same batch size, timed from call to
  return, into a fresh store folder.

The tokenizer is configs/cifar10_vq.yaml's model with random weights (throughput does not depend on them).

    tar -xf ../shared/datasets/cifar10/cifar10-jpeg.tar -C /tmp/cifar
    python scripts/bench_encode.py --images /tmp/cifar/train --limit 10240
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import vqtok
from vqtok.config import AutoencoderConfig, DataConfig, TrainConfig, load_yaml
from vqtok.data import encode_dataset
from vqtok.images import uint8_to_range

ROOT = Path(__file__).resolve().parents[1]


def bare_throughput(tokenizer: vqtok.Autoencoder, batch_size: int, batches: int) -> float:
    """Images/s of range conversion + encode on uint8 batches already in memory."""
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        tokenizer.encode(uint8_to_range(images, tokenizer.config.value_range))  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            tokenizer.encode(uint8_to_range(images, tokenizer.config.value_range))
        return batches * batch_size / (time.perf_counter() - start)


def end_to_end_throughput(tokenizer_dir: Path, images: Path, out: Path, *, batch_size: int, limit: int,
                          workers: int) -> tuple[float, int]:
    """Images/s of a whole `encode_dataset` run, and the store's shard bytes."""
    start = time.perf_counter()
    encode_dataset(str(tokenizer_dir), DataConfig(source="folder", path=str(images), limit=limit), out,
                   batch_size=batch_size, shard_size=5000, num_workers=workers, progress=False)
    elapsed = time.perf_counter() - start
    shard_bytes = sum(p.stat().st_size for p in (out / "shards").glob("*.npy"))
    return limit / elapsed, shard_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, type=Path, help="an extracted CIFAR-10 split folder, e.g. train/")
    parser.add_argument("--limit", type=int, default=10240, help="images to encode end to end")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model_config: AutoencoderConfig = load_yaml(ROOT / "configs" / "cifar10_vq.yaml", TrainConfig).model
    torch.manual_seed(0)
    tokenizer = vqtok.Autoencoder(model_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer.save_pretrained(tokenizer_dir)
        batches = max(2, args.limit // args.batch_size // 4)
        bare = bare_throughput(tokenizer, args.batch_size, batches)
        e2e, shard_bytes = end_to_end_throughput(tokenizer_dir, args.images, Path(tmp) / "store",
                                                 batch_size=args.batch_size, limit=args.limit, workers=args.workers)
        bare_after = bare_throughput(tokenizer, args.batch_size, batches)  # the machine's speed drifts: bracket it
    bare_mean = (bare + bare_after) / 2
    result = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "batch_size": args.batch_size, "images": args.limit, "workers": args.workers,
        "bare_images_per_s": [round(bare, 1), round(bare_after, 1)], "end_to_end_images_per_s": round(e2e, 1),
        "ratio": round(e2e / bare_mean, 3), "bytes_per_image": round(shard_bytes / args.limit, 1),
        "codes_bytes_per_image": 8 * 8 * 2, "grid": list(model_config.latent_grid),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
