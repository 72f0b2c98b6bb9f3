"""`vqtok quickstart`: the whole pipeline on the built-in digits in a few minutes on 2 CPU cores - a small VQ tokenizer,
the digits encoded to token stores, a class-conditional transformer prior on the codes, and a grid of new digits.

The output folder is the quickstart's own: it must be new or empty, and the quickstart marks it
(`.vqtok-quickstart.json`). Run again into a folder it marked, it replaces its earlier outputs - the tokenizer run,
tokens/train and tokens/test, the prior run and samples.png - and nothing else; any other non-empty folder is
refused before anything is trained or deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vqtok.config import (
    AutoencoderConfig,
    DataConfig,
    PreprocessConfig,
    PriorConfig,
    PriorTrainConfig,
    TrainConfig,
    VQConfig,
)

QUICKSTART_CFG = 2.0
QUICKSTART_MARKER = ".vqtok-quickstart.json"
STORES = ("train", "test")  # the token stores under tokens/


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


def quickstart_prior_config(output_dir: str = "runs/quickstart", max_steps: int = 600) -> PriorTrainConfig:
    """A class-conditional transformer prior on the 4x4 codes of the quickstart tokenizer (digits 0-9)."""
    out = Path(output_dir)
    return PriorTrainConfig(
        prior=PriorConfig(n_layer=4, n_head=4, n_embd=128, dropout=0.1, label_dropout=0.1),
        tokens=str(out / "tokens" / "train"),
        eval_tokens=str(out / "tokens" / "test"),
        output_dir=str(out / "prior_run"),
        max_steps=max_steps,
        batch_size=64,
        lr=1e-3,
        warmup_steps=50,
        weight_decay=0.1,
        eval_every=max(1, max_steps // 2),
        checkpoint_every=max_steps,
        log_every=20,
        num_samples=80,
    )


def quickstart(output_dir: str = "runs/quickstart", max_steps: int = 600, prior_steps: int = 600) -> int:
    """The whole pipeline on the built-in digits: tokenizer -> token stores -> prior -> a grid of new digits."""
    from vqtok.data.token_store import encode_dataset
    from vqtok.models import TransformerPrior
    from vqtok.train.loop import train
    from vqtok.train.prior import save_sample_grid, train_prior

    out = Path(output_dir)
    claim_quickstart_folder(out)
    config = quickstart_config(output_dir, max_steps)
    print("[1/4] training a VQ tokenizer on the built-in digits")
    folder = train(config, overwrite=True)  # the folder is this command's: replace its earlier tokenizer run
    metrics = json.loads((out / "final_metrics.json").read_text())
    print("[2/4] encoding the digits to token stores")
    remove_earlier_stores(out)  # codes of an earlier quickstart's tokenizer
    for split in STORES:
        encode_dataset(str(folder), DataConfig(source="digits", split=split), out / "tokens" / split, num_workers=0,
                       progress=False)
    print("[3/4] training a class-conditional transformer prior on the codes")
    prior_config = quickstart_prior_config(output_dir, prior_steps)
    prior_folder = train_prior(prior_config, overwrite=True)
    prior_metrics = json.loads((Path(prior_config.output_dir) / "final_metrics.json").read_text())
    print("[4/4] sampling new digits from the prior")
    prior = TransformerPrior.from_pretrained(prior_folder)
    samples = save_sample_grid(prior, prior.tokenizer, 80, out / "samples.png", seed=0, cfg_scale=QUICKSTART_CFG)
    grid = out / "samples" / f"step_{max_steps:06d}.png"
    print(
        f"\nTokenizer: test PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
        f"{metrics['code_usage'] * 100:.0f}% of 128 codes used (perplexity {metrics['code_perplexity']:.1f}).\n"
        f"Prior: {prior_metrics['held_out_bits_per_code']:.3f} bits per code on the test digits "
        f"(unigram entropy of the codes: {prior_metrics['unigram_bits_per_code']:.3f}).\n"
        f"  new digits:       {samples} (one row per class 0-9, classifier-free guidance {QUICKSTART_CFG})\n"
        f"  tokenizer:        {folder}/ (config.json, model.safetensors, README.md)\n"
        f"  reconstructions:  {grid} (inputs above reconstructions)\n"
        f"  token stores:     {out / 'tokens' / 'train'}/, {out / 'tokens' / 'test'}/\n"
        f"  prior:            {prior_folder}/ (with its tokenizer in tokenizer/)\n"
        f"  metrics:          {out / 'metrics.jsonl'}, {Path(prior_config.output_dir) / 'metrics.jsonl'}\n"
        f"  configs:          {out / 'config.yaml'}, {Path(prior_config.output_dir) / 'config.yaml'}\n"
        f"Next: `vqtok sample --prior {prior_folder} --n 16 --class 3 --cfg-scale 2 --out threes.png`, or in Python: "
        f"prior = vqtok.load('{prior_folder}'); codes = prior.generate(16, labels=3)"
    )
    return 0


def claim_quickstart_folder(out: Path) -> None:
    """Make `out` the quickstart's: it must be new, empty, or marked by an earlier quickstart (whose outputs this one
    replaces); anything else is refused before anything is trained or deleted."""
    from vqtok.files import write_text_atomically
    from vqtok.train.run_folder import RunFolderError, listing

    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not (out / QUICKSTART_MARKER).is_file():
        raise RunFolderError(f"--out {out} is not empty (it holds {listing(entries)}) and was not made by vqtok "
                             "quickstart; nothing was changed: choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / QUICKSTART_MARKER, json.dumps({"made_by": "vqtok quickstart"}) + "\n")


def remove_earlier_stores(out: Path) -> None:
    """Delete the token stores an earlier quickstart wrote into `out` (tokens/train, tokens/test), only those, and
    only in a folder that carries the quickstart's marker."""
    if not (out / QUICKSTART_MARKER).is_file():
        raise FileNotFoundError(f"{out / QUICKSTART_MARKER} is missing: {out} is not a quickstart folder")
    for split in STORES:
        store = out / "tokens" / split
        if store.is_symlink() or store.is_file():
            store.unlink()
        elif store.is_dir():
            shutil.rmtree(store)
