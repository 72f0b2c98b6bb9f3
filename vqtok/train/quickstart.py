"""`vqtok quickstart`: a small VQ tokenizer trained on the built-in digits in a few minutes on 2 CPU cores."""

from __future__ import annotations

import json
from pathlib import Path

from vqtok.config import AutoencoderConfig, DataConfig, PreprocessConfig, TrainConfig, VQConfig


def quickstart_config(output_dir: str = "runs/quickstart", max_steps: int = 600) -> TrainConfig:
    """16x16 grey digits -> a 4x4 grid of codes from a 128-entry EMA codebook (f = 4)."""
    model = AutoencoderConfig(
        in_channels=1,
        resolution=16,
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        mid_attention=True,
        latent_channels=32,
        norm_groups=8,
        input_range="-1,1",
        preprocess=PreprocessConfig(resize=16),
        bottleneck=VQConfig(codebook_size=128, dim=16, kmeans_samples=1024),
    )
    return TrainConfig(
        model=model,
        data=DataConfig(source="digits", split="train"),
        eval_data=DataConfig(source="digits", split="test"),
        output_dir=output_dir,
        max_steps=max_steps,
        batch_size=64,
        lr=1e-3,
        warmup_steps=50,
        eval_every=200,
        eval_images=297,
        checkpoint_every=max_steps,
        log_every=20,
        num_workers=0,
    )


def quickstart(output_dir: str = "runs/quickstart", max_steps: int = 600) -> int:
    from vqtok.train.loop import train

    config = quickstart_config(output_dir, max_steps)
    folder = train(config)
    out = Path(output_dir)
    metrics = json.loads((out / "final_metrics.json").read_text())
    grid = out / "samples" / f"step_{max_steps:06d}.png"
    print(
        f"\nTrained a VQ tokenizer on the built-in digits: test PSNR {metrics['psnr']:.2f} dB, SSIM "
        f"{metrics['ssim']:.3f}, {metrics['code_usage'] * 100:.0f}% of 128 codes used (perplexity "
        f"{metrics['code_perplexity']:.1f}).\n"
        f"  tokenizer:        {folder}/ (config.json, model.safetensors, README.md)\n"
        f"  reconstructions:  {grid} (inputs above reconstructions)\n"
        f"  metrics:          {out / 'metrics.jsonl'}, {out / 'final_metrics.json'}\n"
        f"  config:           {out / 'config.yaml'} (edit it and run `vqtok train {out / 'config.yaml'}`)\n"
        f"Next: `vqtok eval {folder} --data digits --split test`, or in Python: "
        f"tok = vqtok.load('{folder}'); codes = tok.encode(tok.preprocess(images))"
    )
    return 0
