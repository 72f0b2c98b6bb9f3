"""`compile: true` (issue 16): the networks compiled in place with torch.compile (CPU inductor here) train, resume
exactly, keep their checkpoints' keys, and compute what the eager networks compute. The run has the VQGAN's
adversarial term with its adaptive weight from step 1 (two gradients through the compiled decoder). Tiny models, few
runs: compiling is slow on two cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.scripts.common import tiny_train_config
from vqtok.config import AdversarialConfig, DiscriminatorConfig
from vqtok.train import train


def metrics_lines(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def compiled_config(out: Path, **overrides):
    adversarial = AdversarialConfig(discriminator=DiscriminatorConfig(in_channels=1, channels=8, layers=1),
                                    start_step=1, adaptive_weight=True)
    settings = dict(max_steps=3, eval_every=3, checkpoint_every=3, eval_images=8, compile=True,
                    adversarial=adversarial)
    return tiny_train_config(str(out), **{**settings, **overrides})


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    from torch._dynamo.utils import counters

    root = tmp_path_factory.mktemp("compiled")
    graphs = counters["stats"]["unique_graphs"]
    folder = train(compiled_config(root / "whole"))
    assert counters["stats"]["unique_graphs"] - graphs >= 3  # encoder, decoder, discriminator at least
    return root, folder


def test_a_compiled_run_trains_and_matches_eager_on_the_first_step(compiled_run, tmp_path):
    root, folder = compiled_run
    eager = train(compiled_config(tmp_path / "eager", compile=False, max_steps=2, eval_every=2, checkpoint_every=2))
    compiled_loss, eager_loss = metrics_lines(root / "whole")[0]["loss"], metrics_lines(tmp_path / "eager")[0]["loss"]
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    assert load_file(folder / "model.safetensors").keys() == load_file(eager / "model.safetensors").keys()
    assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


def test_a_compiled_run_resumes_exactly(compiled_run, tmp_path):
    root, folder = compiled_run
    config = compiled_config(tmp_path / "split", checkpoint_every=1)
    assert train(config, stop_at=2) is None
    resumed = train(config, resume=True)
    losses = lambda run: [(r["step"], r["loss"]) for r in metrics_lines(run)]  # noqa: E731
    assert losses(tmp_path / "split") == losses(root / "whole")
    whole, split = load_file(folder / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(whole[k], split[k]) for k in whole)
