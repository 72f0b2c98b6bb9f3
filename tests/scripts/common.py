"""Models and steps shared by the multi-process scripts and the single-process references they are compared to."""

import torch

from tests.conftest import tiny_config
from vqtok import Autoencoder
from vqtok.config import VQConfig


def batch() -> torch.Tensor:
    return torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(123)) * 2 - 1


def ema_model() -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(tiny_config(VQConfig(codebook_size=32, dim=4, kmeans_init=False, dead_threshold=0.0))).train()


def kmeans_restart_model() -> Autoencoder:
    torch.manual_seed(1)
    config = VQConfig(codebook_size=64, dim=4, kmeans_samples=128, dead_threshold=0.9, decay=0.5)
    return Autoencoder(tiny_config(config)).train()


def fsq_model() -> Autoencoder:
    torch.manual_seed(2)
    from vqtok.bottleneck.fsq import FSQConfig
    return Autoencoder(tiny_config(FSQConfig(levels=(5, 4, 3)))).train()


def lfq_model() -> Autoencoder:
    torch.manual_seed(4)
    from vqtok.bottleneck.lfq import LFQConfig
    return Autoencoder(tiny_config(LFQConfig(bits=6))).train()


def rvq_model(**overrides) -> Autoencoder:
    torch.manual_seed(3)
    from vqtok.bottleneck.rvq import RVQConfig
    settings = dict(depth=2, codebook_size=16, dim=4, kmeans_init=False, dead_threshold=0.0)
    return Autoencoder(tiny_config(RVQConfig(**{**settings, **overrides}))).train()


def train_step(module, model: Autoencoder, x: torch.Tensor) -> dict:
    """Forward (through DDP when given), backward, SGD step, then the once-per-step bottleneck hook."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = module(x)
    ((out.reconstruction - x).pow(2).mean() + out.loss).backward()
    optimizer.step()
    return model.on_optimizer_step()


def tiny_train_config(output_dir: str, *, vq: VQConfig | None = None, **overrides):
    """A few-second training run on the built-in digits (resized to 16x16) with a tiny VQ model."""
    from vqtok.config import DataConfig, PreprocessConfig, TrainConfig

    model = tiny_config(
        vq or VQConfig(codebook_size=16, dim=4, kmeans_samples=64), in_channels=1, base_channels=8, norm_groups=4,
        attn_resolutions=(), preprocess=PreprocessConfig(resize=16),
    )
    settings = dict(model=model, data=DataConfig(source="digits", limit=256), output_dir=output_dir, max_steps=6,
                    batch_size=16, lr=1e-3, warmup_steps=2, eval_every=3, eval_images=32, checkpoint_every=3,
                    log_every=1, num_workers=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def tiny_hvae_train_config(output_dir: str, **overrides):
    """A few-second training run of a tiny two-scale, two-group hierarchical VAE on the digits (resized to 8x8 and
    binarized afresh at every draw; evaluated on test digits binarized once), Bernoulli likelihood."""
    from vqtok.config import DataConfig, PreprocessConfig, TrainConfig
    from vqtok.models.hierarchical_vae import HierarchicalVAEConfig

    model = HierarchicalVAEConfig(in_channels=1, resolution=8, scales=(4, 2), groups_per_scale=(1, 1), latent_channels=2,
                                  width=8, encoder_cells=1, cells_per_group=1, preprocess=PreprocessConfig(resize=8))
    settings = dict(model=model, data=DataConfig(source="digits", limit=256, binarize="dynamic"),
                    eval_data=DataConfig(source="digits", split="test", limit=32, binarize="once"), output_dir=output_dir,
                    max_steps=6, batch_size=16, lr=1e-3, warmup_steps=2, eval_every=3, eval_images=32,
                    checkpoint_every=3, log_every=1, num_workers=0, loss="bernoulli")
    settings.update(overrides)
    return TrainConfig(**settings)


# k-means draws its reservoir on each rank and restarts draw rank-local candidates, so runs with different world
# sizes start from different codebooks; equality with one process is checked with both off (agreement of k-means and
# restarts across ranks is tested in tests/test_distributed.py).
WORLD_INVARIANT_VQ = VQConfig(codebook_size=16, dim=4, kmeans_init=False, dead_threshold=0.0)


# ---- comparing weights of runs that should agree -------------------------------------------------------------------
#
# Softmax attention is invariant to adding the same vector to every key, so the bias of the key projection has a
# gradient that is exactly zero in exact arithmetic (sum over keys of p_ij (v_j - out_i) = 0) whenever the key bias
# reaches every key unchanged: the tokenizer's AttnBlock, and the prior's qkv bias with learned positions (rotary
# positions rotate the bias differently at every key, so there it has a real gradient). In float32 that gradient is
# rounding noise whose sign depends on kernel order, and AdamW divides it by its own RMS: those entries take
# full-size, arbitrary steps that differ between a run on one batch and the same run split over micro-batches or
# processes (seen on torch 2.14.1, 3.3e-5 after 4 steps). They change nothing the model computes, so runs are
# compared on every other weight, and on their outputs. `test_gradient_free_entries_have_zero_gradient` checks, in
# float64, that exactly these entries have zero gradient.


def gradient_free_entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> boolean mask of its entries whose true gradient is zero for any loss (see above)."""
    from vqtok.models.prior import CausalSelfAttention, TransformerPrior
    from vqtok.nn.blocks import AttnBlock

    masks = {}
    learned_positions = not isinstance(model, TransformerPrior) or model.config.positions == "learned"
    for name, module in model.named_modules():
        if isinstance(module, AttnBlock) and module.k.bias is not None:
            masks[f"{name}.k.bias"] = torch.ones_like(module.k.bias, dtype=torch.bool)
        if isinstance(module, CausalSelfAttention) and module.qkv.bias is not None and learned_positions:
            mask = torch.zeros_like(module.qkv.bias, dtype=torch.bool)
            width = mask.numel() // 3  # the (q, k, v) thirds of the projection's output
            mask[width : 2 * width] = True
            masks[f"{name}.qkv.bias"] = mask
    return masks


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model: torch.nn.Module,
                        *, rtol: float, atol: float) -> None:
    """Every tensor of two state dicts agrees within the tolerance, except the entries whose true gradient is zero
    (`gradient_free_entries` of `model`, the architecture both were saved from), which need only be finite."""
    assert actual.keys() == expected.keys()
    free = gradient_free_entries(model)
    for name, tensor in expected.items():
        other = actual[name]
        if name in free:
            mask = free[name]
            assert torch.isfinite(other).all(), name
            other, tensor = other[~mask], tensor[~mask]
        torch.testing.assert_close(other, tensor, rtol=rtol, atol=atol, msg=name)


def run_two_ranks(out, **env: str) -> None:
    """tests/scripts/train_two_ranks.py under `torchrun --nproc_per_node 2` (gloo, one thread each) writing to `out`,
    with `env` switching its model (GAN=1, HVAE=1); asserts that it succeeded and really ran two ranks."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "tests" / "scripts" / "train_two_ranks.py"), str(out)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), **env}
    result = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [json.loads((Path(out) / f"world{r}.json").read_text())["world"] for r in range(2)] == [2, 2]


def bottleneck_config_error(tmp_path, bottleneck: dict) -> str:
    """The one-line ConfigError of a training YAML whose model.bottleneck is `bottleneck`."""
    import json

    import pytest

    from vqtok.config import ConfigError, TrainConfig, load_yaml

    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"model": {"bottleneck": bottleneck}}))
    with pytest.raises(ConfigError) as error:
        load_yaml(path, TrainConfig)
    assert "\n" not in str(error.value)
    return str(error.value)


def through_store_and_prior(tok_dir, tmp_path, *, vocab_size: int, dtype: str):
    """A trained discrete tokenizer -> train and test token stores of the digits (codes in `dtype`) -> a two-step
    prior -> two sampled code grids -> images; returns the prior."""
    import numpy as np

    import vqtok
    from vqtok.config import DataConfig, PriorConfig, PriorTrainConfig
    from vqtok.data import TokenDataset, encode_dataset
    from vqtok.train.prior import train_prior

    for split, limit in (("train", 64), ("test", 16)):
        encode_dataset(str(tok_dir), DataConfig(source="digits", split=split, limit=limit), tmp_path / split,
                       num_workers=0, progress=False, shard_size=32)
    store = TokenDataset(tmp_path / "train")
    assert store.vocab_size == vocab_size and store.manifest["dtype"] == dtype
    assert np.load(next((tmp_path / "train" / "shards").glob("codes-*.npy"))).dtype == np.dtype(dtype)
    prior_dir = train_prior(PriorTrainConfig(
        prior=PriorConfig(n_layer=1, n_head=2, n_embd=16), tokens=str(tmp_path / "train"),
        eval_tokens=str(tmp_path / "test"), output_dir=str(tmp_path / "prior"), max_steps=2, batch_size=8, lr=1e-3,
        warmup_steps=1, eval_every=2, checkpoint_every=2, log_every=1, num_samples=2))
    prior = vqtok.load(prior_dir)
    assert prior.config.vocab_size == vocab_size and prior.config.grid == store.grid
    codes = prior.generate(2, seed=0)
    assert codes.shape == (2, *store.grid) and 0 <= int(codes.min()) and int(codes.max()) < vocab_size
    images = prior.tokenizer.decode(codes)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    return prior


def saved_and_reloaded(model: Autoencoder, tmp_path, *, required_key: str,
                       unexpected_key: str | None = None) -> tuple[Autoencoder, dict]:
    """Save a discrete tokenizer in the Hub format (tmp_path / "tok") and load it back: the config and every tensor
    equal, the same codes for the same images, and loading is strict - a state dict without `required_key` (or with
    `unexpected_key` added) refused. Returns the loaded model and the saved config.json."""
    import json

    import pytest

    import vqtok

    model.save_pretrained(tmp_path / "tok")
    saved = json.loads((tmp_path / "tok" / "config.json").read_text())
    loaded = vqtok.load(tmp_path / "tok")
    assert loaded.config == model.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), model.eval().encode(x))
    state = model.state_dict()
    if unexpected_key is not None:
        with pytest.raises(RuntimeError, match=unexpected_key.rsplit(".", 1)[-1]):
            loaded.load_state_dict({**state, unexpected_key: torch.zeros(3)})
    with pytest.raises(RuntimeError, match=required_key.split(".", 1)[-1]):
        loaded.load_state_dict({k: v for k, v in state.items() if k != required_key})
    return loaded, saved
