"""The training step never makes the host wait for the device (issue 16): every op of the tokenizer's and the prior's
step between two log steps runs under `tests.host_sync.no_host_sync()` (on CUDA: under torch's own sync debug
mode), and a skipped update (a NaN gradient) is still a skip, decided on the device."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.host_sync import HostSync, no_host_sync
from tests.scripts.common import tiny_hvae_train_config, tiny_train_config
from vqtok.config import DataConfig, GaussianConfig, PreprocessConfig, PriorConfig, PriorTrainConfig, VQConfig
from vqtok.models import Autoencoder
from vqtok.train import engine, loop, train
from vqtok.train import prior as prior_loop
from vqtok.train.prior import train_prior
from vqtok.train.schedules import lr_factor


def metrics_lines(run: Path, split: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def guard_steps(monkeypatch, module, guard=no_host_sync) -> list[str]:
    """Run every call of `module`'s per-step functions (the micro-batches' forward and backward, the update or
    skip) under `guard`; returns the list of guarded calls made. Reads happen outside them (log_metrics,
    check_skips), at log and checkpoint steps."""
    calls: list[str] = []
    for name in ("_accumulate_step", "finish_step"):
        original = getattr(module, name)

        def guarded(*args, _original=original, _name=name, **kwargs):
            with guard():
                result = _original(*args, **kwargs)
            calls.append(_name)
            return result
        monkeypatch.setattr(module, name, guarded)
    return calls


def gaussian_config(out: Path, **overrides):
    """A tiny Gaussian VAE, flipped images, two micro-batches and free bits (the step's KL mean over both)."""
    model = replace(tiny_train_config("unused").model, bottleneck=GaussianConfig(dim=4, free_bits=0.01))
    settings = dict(model=model, loss="gaussian", hflip=True, grad_accum=2, max_steps=4, log_every=4, eval_every=4,
                    checkpoint_every=4, eval_images=8)
    return tiny_train_config(str(out), **{**settings, **overrides})


def vq_config(out: Path, **overrides):
    vq = VQConfig(codebook_size=16, dim=4, kmeans_init=False, dead_threshold=0.5)  # (k-means: a one-off warm-up)
    settings = dict(max_steps=5, log_every=5, eval_every=5, checkpoint_every=5, eval_images=8)
    return tiny_train_config(str(out), vq=vq, **{**settings, **overrides})


@pytest.mark.parametrize("kind", ["vq", "gaussian", "hierarchical"])
def test_the_tokenizer_step_never_syncs(kind, tmp_path, monkeypatch):
    """Codebook EMA and restarts, posterior noise, flips, free bits
    over micro-batches, dynamic binarization: all without a host-device synchronisation."""
    calls = guard_steps(monkeypatch, loop)
    if kind == "vq":
        config = vq_config(tmp_path / "run")
    elif kind == "gaussian":
        config = gaussian_config(tmp_path / "run")
    else:
        config = tiny_hvae_train_config(str(tmp_path / "run"), max_steps=3, log_every=3, eval_every=3,
                                        checkpoint_every=3, eval_images=8, hflip=True)
    train(config)
    assert calls.count("finish_step") == config.max_steps  # the guard really ran at every step
    assert metrics_lines(tmp_path / "run")[-1]["skipped_total"] == 0


def test_the_guard_fails_on_a_reintroduced_host_read(tmp_path, monkeypatch):
    """The old `float(accelerator.clip_grad_norm_(...))`, put back: the guarded step fails, naming the op."""
    guard_steps(monkeypatch, loop)
    original = engine.grad_norm_of
    monkeypatch.setattr(engine, "grad_norm_of", lambda *a, **k: torch.tensor(float(original(*a, **k))))
    with pytest.raises(HostSync, match="_local_scalar_dense"):
        train(gaussian_config(tmp_path / "run"))


TINY_PRIOR = PriorConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.1)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from tests.conftest import tiny_config
    from vqtok.data.token_store import encode_dataset
    from vqtok.models.autoencoder import Autoencoder as Tokenizer

    root = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    tokenizer = Tokenizer(tiny_config(VQConfig(codebook_size=16, dim=4, kmeans_init=False), in_channels=1,
                                      base_channels=8, norm_groups=4, attn_resolutions=(),
                                      preprocess=PreprocessConfig(resize=16))).eval()
    tokenizer.save_pretrained(root / "tok")
    encode_dataset(str(root / "tok"), DataConfig(source="digits", limit=120), root / "train", num_workers=0,
                   progress=False)
    return root


def test_the_prior_step_never_syncs(store, tmp_path, monkeypatch):
    calls = guard_steps(monkeypatch, prior_loop)
    config = PriorTrainConfig(prior=TINY_PRIOR, tokens=str(store / "train"), output_dir=str(tmp_path / "prior"),
                              max_steps=4, batch_size=8, grad_accum=2, warmup_steps=1, log_every=4, eval_every=4,
                              checkpoint_every=4, eval_items=8, num_samples=2)
    train_prior(config)
    assert calls.count("finish_step") == 4
    line = metrics_lines(tmp_path / "prior")[-1]
    assert line["skipped_total"] == 0 and line["tflops"] > 0 and "mfu" not in line  # no known peak on a CPU


def test_a_nan_gradient_is_skipped_on_the_device(tmp_path, monkeypatch):
    """Step 2's gradients made NaN: its update is skipped - weights, AdamW's moments and step count, the weights'
    EMA unchanged; the bottleneck's hook told (a 0-d device bool tensor); the counters count it - and the learning
    rate schedule still advances (a function of the step alone)."""
    poisoned = 1  # 0-based: the second optimizer step
    seen: dict[str, object] = {}
    original_accumulate, original_finish = loop._accumulate_step, loop.finish_step

    def accumulate(config, accelerator, model, image_losses, host, step, *args):
        logs = original_accumulate(config, accelerator, model, image_losses, host, step, *args)
        if step == poisoned:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return logs

    def finish(config, accelerator, model, optimizer, scheduler, counters, **kwargs):
        before = counters.step
        if before == poisoned:
            raw = accelerator.unwrap_model(model)
            seen["weights"] = {k: v.clone() for k, v in raw.state_dict().items()}
            seen["moments"] = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.optimizer.state.items()}
            seen["ema"] = {k: v.clone() for k, v in kwargs["ema"].shadow.items()}
        with no_host_sync():
            logs = original_finish(config, accelerator, model, optimizer, scheduler, counters, **kwargs)
        if before == poisoned:
            raw = accelerator.unwrap_model(model)
            for k, v in raw.state_dict().items():
                assert torch.equal(v, seen["weights"][k]), k
            for p, s in optimizer.optimizer.state.items():
                for k, v in s.items():
                    assert torch.equal(v, seen["moments"][id(p)][k]), k
            for k, v in kwargs["ema"].shadow.items():
                assert torch.equal(v, seen["ema"][k]), k
            seen["checked"] = True
        return logs

    hooks = []
    original_hook = Autoencoder.on_optimizer_step

    def hook(self, skipped=False):
        hooks.append(skipped)
        return original_hook(self, skipped=skipped)

    monkeypatch.setattr(loop, "_accumulate_step", accumulate)
    monkeypatch.setattr(loop, "finish_step", finish)
    monkeypatch.setattr(Autoencoder, "on_optimizer_step", hook)
    config = gaussian_config(tmp_path / "run", max_steps=3, log_every=1, weights_ema=0.9)
    train(config)
    assert seen.get("checked")
    assert all(isinstance(s, torch.Tensor) and s.ndim == 0 and s.dtype == torch.bool for s in hooks)
    assert [bool(s) for s in hooks] == [False, True, False]
    lines = metrics_lines(tmp_path / "run")
    assert [r["skipped_total"] for r in lines] == [0, 1, 1]
    assert [r["lr"] for r in lines] == pytest.approx(
        [config.lr * lr_factor(s, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                               min_ratio=config.min_lr_ratio) for s in (1, 2, 3)])


def test_too_many_skips_stop_the_run_at_the_next_log_step(tmp_path):
    """The skip counters are read at log (and checkpoint) steps: a diverged run stops at the first of those after
    more than max_consecutive_skips skips in a row, saying how many."""
    config = tiny_train_config(str(tmp_path / "run"), skip_grad_norm=1e-12, max_consecutive_skips=2, log_every=4,
                               checkpoint_every=6, eval_every=6, max_steps=6)
    with pytest.raises(engine.TooManySkippedSteps, match="4 consecutive updates skipped by step 4"):
        train(config)


@contextmanager
def cuda_guard():
    """torch.cuda.set_sync_debug_mode("error") while it lasts."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_step_never_syncs(tmp_path, monkeypatch):
    """On a GPU, torch's own sync debug mode (which also sees host-to-device copies from pageable memory): a VQ
    tokenizer with the weights' EMA, a Gaussian VAE, a hierarchical VAE with KL balancing."""
    calls = guard_steps(monkeypatch, loop, guard=cuda_guard)
    config = vq_config(tmp_path / "vq", mixed_precision="bf16", weights_ema=0.9)
    train(config)
    train(gaussian_config(tmp_path / "vae", mixed_precision="bf16"))
    hvae = tiny_hvae_train_config(str(tmp_path / "hvae"), max_steps=3, log_every=3, eval_every=3, checkpoint_every=3,
                                  eval_images=8, kl_schedule="linear", kl_warmup_steps=10)
    train(replace(hvae, model=replace(hvae.model, kl_balance=True)))  # NVAE's KL balancing during the warm-up
    assert calls.count("finish_step") == config.max_steps + 4 + 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_prior_step_never_syncs(store, tmp_path, monkeypatch):
    calls = guard_steps(monkeypatch, prior_loop, guard=cuda_guard)
    config = PriorTrainConfig(prior=TINY_PRIOR, tokens=str(store / "train"), output_dir=str(tmp_path / "prior"),
                              max_steps=4, batch_size=8, grad_accum=2, warmup_steps=1, log_every=4, eval_every=4,
                              checkpoint_every=4, eval_items=8, num_samples=2, mixed_precision="bf16")
    train_prior(config)
    assert calls.count("finish_step") == 4


# ---- FLOPs and MFU ---------------------------------------------------------------------------------------------------


def test_counted_flops_equal_a_hand_count():
    """Two linear layers, batch M: forward 2 M (K N + N P); backward the weights' gradients of both (2 M K N + 2 M N P)
    and the input gradient of the second only (2 M N P; the data needs none)."""
    m, k, n, p = 8, 16, 32, 4
    net = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False), torch.nn.Linear(n, p, bias=False))
    x = torch.randn(m, k)

    def forward_backward():
        torch.autograd.grad(net(x).square().sum(), list(net.parameters()))

    forward = 2 * m * (k * n + n * p)
    assert engine.count_flops(forward_backward) == forward + 2 * m * k * n + 2 * (2 * m * n * p)


def test_throughput_reports_tflops_and_mfu():
    throughput = engine.Throughput(0, processes=2, peak=100.0)
    throughput.flops_per_step = 10**12
    throughput.time -= 2.0  # two seconds for 4 steps
    logs = throughput.interval(4)
    assert logs["steps_per_s"] == pytest.approx(2.0, rel=0.01)
    assert logs["tflops"] == pytest.approx(4.0, rel=0.01)  # 1 TFLOP per step per process, 2 processes, 2 steps/s
    assert logs["mfu"] == pytest.approx(4.0 / 200.0, rel=0.01)


def test_the_weights_ema_saves_contiguous_copies_of_channels_last_weights(tmp_path):
    """On CUDA the convolutional models train channels_last; the EMA's copies must stay contiguous, or safetensors
    refuses to save them in the checkpoint."""
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))
    engine.to_channels_last(model)
    assert not model[0].weight.is_contiguous()
    ema = engine.WeightsEMA(model, 0.9)
    assert all(t.is_contiguous() for t in ema.shadow.values())
    save_file(ema.shadow, tmp_path / "ema.safetensors")


def test_a_device_skip_survives_an_optimizer_step_that_clears_found_inf():
    """A GradScaler's step sets and deletes `found_inf` itself: step_unless must not fail afterwards."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = engine.make_adamw([param], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    original = optimizer.step

    def step_like_a_scaler(*args, **kwargs):
        original(*args, **kwargs)
        del optimizer.found_inf

    optimizer.step = step_like_a_scaler
    param.grad = torch.ones(3)
    assert engine.takes_device_skip(optimizer)
    engine.step_unless(optimizer, torch.tensor(True))
    assert torch.equal(param.detach(), torch.ones(3))  # skipped
    engine.step_unless(optimizer, torch.tensor(False))
    assert not torch.equal(param.detach(), torch.ones(3))  # applied
