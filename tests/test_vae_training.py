"""Training VAEs (Gaussian and hierarchical): the KL objective over the optimizer step's whole batch, exact resume in
the KL warm-up, two processes against one, a run that diverges, and a short real run on binarized MNIST."""

import json
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

import vqtok
from tests.conftest import MNIST, tiny_config
from tests.scripts.common import run_two_ranks, tiny_hvae_train_config, tiny_train_config
from vqtok.config import DataConfig, GaussianConfig, PreprocessConfig, TrainConfig
from vqtok.models.hierarchical_vae import HierarchicalVAEConfig
from vqtok.train import loop, train
from vqtok.train.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]


def metrics_lines(run: Path, split="train"):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def gaussian_free_bits_config(output_dir: str, free_bits: float, **overrides) -> TrainConfig:
    """A tiny Gaussian VAE (no attention: no parameter with a zero true gradient) on the digits."""
    model = tiny_config(GaussianConfig(dim=2, free_bits=free_bits), in_channels=1, base_channels=8, norm_groups=4,
                        attn_resolutions=(), mid_attention=False, preprocess=PreprocessConfig(resize=16))
    return tiny_train_config(output_dir, model=model, loss="gaussian", max_steps=3, eval_every=3, checkpoint_every=3,
                             eval_images=8, **overrides)


def median_step_kl(config: TrainConfig) -> float:
    """The median over latent elements of the first step's average KL at initialisation: a free-bits floor that
    holds about half of the elements, so micro-batches disagree about which ones."""
    torch.manual_seed(config.seed)
    model = vqtok.Autoencoder(config.model).train()
    from vqtok.data import build_dataset

    dataset = build_dataset(config.data, channels=1, preprocess=config.model.preprocess, size=16)
    x = torch.stack([dataset[i][0] for i in range(config.batch_size)]).float() / 127.5 - 1
    return model(x).bottleneck.kl_units.mean(0).median().item()


def test_free_bits_hold_on_the_optimizer_steps_whole_batch(tmp_path):
    """Two micro-batches of 8 = one batch of 16 with free bits that hold about half the latent elements. Clamping
    each micro-batch's average (vqtok before issue 13) changes the objective: its weights differ by about 1e-3
    here, 100x the tolerance."""
    floor = median_step_kl(gaussian_free_bits_config("unused", 0.0))
    whole = train(gaussian_free_bits_config(str(tmp_path / "whole"), floor))
    micro = train(gaussian_free_bits_config(str(tmp_path / "micro"), floor, grad_accum=2))
    a, b = load_file(whole / "model.safetensors"), load_file(micro / "model.safetensors")
    assert max_difference(a, b) < 1e-5
    with mock.patch.object(vqtok.Autoencoder, "regularisation", lambda self, out, **_: out.bottleneck.loss):
        clamped = train(gaussian_free_bits_config(str(tmp_path / "per_micro"), floor, grad_accum=2))
    assert max_difference(a, load_file(clamped / "model.safetensors")) > 1e-4  # the old objective is another one


def test_hierarchical_accumulation_matches_one_batch_with_free_bits_and_balancing(tmp_path):
    """In the KL warm-up (balancing on) with free bits per group: posterior samples are drawn per image, and both
    the floor and the balancing coefficients come from the step's whole batch, so 2 x 8 = 16."""
    settings = dict(max_steps=3, kl_schedule="linear", kl_warmup_steps=10)
    model = replace(tiny_hvae_train_config("unused").model, free_bits=0.01, kl_balance=True)
    whole = train(tiny_hvae_train_config(str(tmp_path / "whole"), model=model, **settings))
    micro = train(tiny_hvae_train_config(str(tmp_path / "micro"), model=model, grad_accum=2, **settings))
    assert max_difference(load_file(whole / "model.safetensors"), load_file(micro / "model.safetensors")) < 1e-5
    kls = lambda run: [r["kl"] for r in metrics_lines(run)]  # noqa: E731
    assert kls(tmp_path / "micro") == pytest.approx(kls(tmp_path / "whole"), rel=1e-4)


def test_hierarchical_resume_in_the_kl_warm_up_is_exact(tmp_path):
    model = replace(tiny_hvae_train_config("unused").model, kl_balance=True)
    settings = dict(model=model, max_steps=4, kl_schedule="linear", kl_warmup_steps=8, eval_every=4,
                    checkpoint_every=4)
    full = train(tiny_hvae_train_config(str(tmp_path / "full"), **settings))
    config = tiny_hvae_train_config(str(tmp_path / "split"), **settings)
    assert train(config, stop_at=2) is None
    resumed = train(config, resume=True)
    losses = lambda run: [(r["step"], r["loss"], r["kl"], r["kl_weight"]) for r in metrics_lines(run)]  # noqa: E731
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # bit for bit on CPU
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(vqtok.load(resumed), vqtok.HierarchicalVAE)


@pytest.mark.slow
def test_hierarchical_two_processes_match_one(tmp_path):
    run_two_ranks(tmp_path, HVAE="1")
    single = train(tiny_hvae_train_config(str(tmp_path / "single"), max_steps=4, hflip=True))
    weights = load_file(single / "model.safetensors")
    for rank in range(2):
        assert max_difference(load_file(tmp_path / f"rank{rank}.safetensors"), weights) < 1e-5
    kls = lambda run: [r["kl"] for r in metrics_lines(run)]  # noqa: E731
    assert kls(tmp_path / "run") == pytest.approx(kls(tmp_path / "single"), rel=0, abs=1e-6)  # KLs of ~1e-4 nats


def test_a_diverged_hierarchical_run_stops_and_exports_nothing(tmp_path):
    """NaN weights are never exported: a run whose weights went non-finite stops with an error naming them."""
    config = tiny_hvae_train_config(str(tmp_path / "run"), max_steps=2, eval_every=10, checkpoint_every=10)
    original = loop.finish_step

    def poison(config_, accelerator, model, *args, **kwargs):
        logs = original(config_, accelerator, model, *args, **kwargs)
        with torch.no_grad():
            accelerator.unwrap_model(model).head.bias.fill_(float("nan"))
        return logs

    with mock.patch.object(loop, "finish_step", poison), pytest.raises(RuntimeError, match="head.bias.*diverged"):
        train(config)
    assert not (tmp_path / "run" / "tokenizer").exists()


BINARY_MNIST = MNIST / "train-images-idx3-ubyte.gz"


@pytest.mark.slow
def test_short_binarized_mnist_run_iwae_beats_elbo_and_a_single_level_vae(tmp_path):
    """300 steps (batch 64, dynamically binarized MNIST) of a 2-scale, 3-group model and of the same architecture
    with one group, then the bounds on 500 test images binarized once. Measured (torch 2.14.1, CPU): hierarchical
    ELBO 121.4, IWAE-5 115.0 nats; single-level IWAE-5 126.5. The asserted margins, 2 and 4 nats, are a third of the
    measured gaps (6.4 and 11.5): room for other torch versions' rounding, which changes a 300-step run's bounds by
    far less than a nat, while a model whose hierarchy did nothing would fail the second."""
    if not BINARY_MNIST.is_file():
        pytest.skip(f"MNIST not found under {MNIST}")
    results = {}
    for name, groups in (("hierarchical", (1, 2)), ("single", (1, 0))):
        model = HierarchicalVAEConfig(in_channels=1, resolution=28, scales=(4, 2), groups_per_scale=groups,
                                      latent_channels=8, width=32, encoder_cells=1, cells_per_group=1)
        config = TrainConfig(
            model=model, output_dir=str(tmp_path / name), max_steps=300, batch_size=64, lr=2e-3, warmup_steps=20,
            data=DataConfig(source="idx", path=str(BINARY_MNIST), limit=20000, binarize="dynamic"),
            eval_data=DataConfig(source="idx", path=str(MNIST / "t10k-images-idx3-ubyte.gz"), limit=500,
                                 binarize="once"),
            loss="bernoulli", kl_schedule="linear", kl_warmup_steps=100, eval_every=300, eval_images=500,
            checkpoint_every=300, log_every=50, num_workers=0)
        folder = train(config)
        from vqtok.data import build_dataset

        test = build_dataset(config.eval_data, channels=1, preprocess=model.preprocess, size=28)
        results[name] = evaluate(vqtok.load(folder), test, iwae=5)
    hvae, single = results["hierarchical"], results["single"]
    assert hvae["iwae_nats"] < hvae["neg_elbo_nats"] - 2.0, hvae
    assert hvae["iwae_nats"] < single["iwae_nats"] - 4.0, (hvae, single)


def test_the_vqgan_terms_are_refused_for_a_hierarchical_vae():
    from vqtok.config import AdversarialConfig, ConfigError, DiscriminatorConfig

    model = replace(tiny_hvae_train_config("unused").model, decoder_output="image")
    adversarial = AdversarialConfig(discriminator=DiscriminatorConfig(in_channels=1, channels=8, layers=1))
    with pytest.raises(ConfigError, match="adversarial .* train an autoencoder"):
        tiny_hvae_train_config("unused", model=model, loss="gaussian", adversarial=adversarial)


def test_kl_balancing_without_a_kl_warm_up_is_refused():
    """Balancing acts only while the KL weight is below 1: with a constant schedule it would silently do nothing."""
    from vqtok.config import ConfigError

    model = replace(tiny_hvae_train_config("unused").model, kl_balance=True)
    with pytest.raises(ConfigError, match="kl_balance .* kl_schedule is 'constant'"):
        tiny_hvae_train_config("unused", model=model)


def test_a_hierarchical_vae_trains_with_a_gaussian_likelihood_for_continuous_images(tmp_path):
    """decoder_output 'image' with loss 'gaussian' (unit variance, nats per image): a run exports a model whose
    evaluation reports the KL and active units but no code length (the likelihood is not discrete)."""
    model = replace(tiny_hvae_train_config("unused").model, decoder_output="image", input_range="-1,1")
    data = DataConfig(source="digits", limit=256)
    config = tiny_hvae_train_config(str(tmp_path / "run"), model=model, loss="gaussian", data=data, eval_data=None,
                                    max_steps=2, eval_every=2, checkpoint_every=2)
    folder = train(config)
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert "kl_nats_per_image" in metrics and "active_units" in metrics and "neg_elbo_nats" not in metrics
    assert isinstance(vqtok.load(folder), vqtok.HierarchicalVAE)
