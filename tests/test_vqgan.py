"""The VQGAN recipe: the adaptive weight, the adversarial losses, LPIPS against the `lpips` package, the PatchGAN,
and training runs with both terms (resume, fine-tuning from a saved tokenizer and discriminator, two processes)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lpips
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

import vqtok
from tests.conftest import tiny_config
from tests.scripts.common import WORLD_INVARIANT_VQ, run_two_ranks, tiny_train_config
from vqtok import Autoencoder
from vqtok.cli import main
from vqtok.config import AdversarialConfig, ConfigError, DataConfig, DiscriminatorConfig, PerceptualConfig, VQConfig
from vqtok.data import build_dataset
from vqtok.losses import adaptive_gan_weight, discriminator_loss, generator_loss
from vqtok.models.discriminator import PatchDiscriminator
from vqtok.nn.perceptual import LPIPS, lpips_state_dict
from vqtok.train import train
from vqtok.train.adversarial import ImageLosses, build_discriminator
from vqtok.train.engine import accelerate_run
from vqtok.train.loop import initial_model

ROOT = Path(__file__).resolve().parents[1]
LPIPS_HEADS = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


def metrics_lines(run: Path, split="train"):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.fixture(scope="module")
def peer_lpips():
    """The reference implementation with a random VGG16 (nothing downloaded) and its published linear heads."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torchvision's deprecation notes about how lpips asks for an untrained VGG
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory, peer_lpips):
    """Our weights file made from the peer's random backbone (in torchvision's layout) and the real heads."""
    vgg = {}
    for key, tensor in peer_lpips.net.state_dict().items():  # slice{k}.{index}.weight -> features.{index}.weight
        _, index, name = key.split(".")
        vgg[f"features.{index}.{name}"] = tensor
    heads = torch.load(LPIPS_HEADS, map_location="cpu", weights_only=True)
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in lpips_state_dict(vgg, heads).items()}, str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------
# The adaptive weight and the adversarial losses


def _tiny_pair():
    torch.manual_seed(0)
    model = Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4, kmeans_init=False))).double()
    discriminator = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=1)).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    return model, discriminator, x


def test_adaptive_gan_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    model, discriminator, x = _tiny_pair()
    last = model.decoder.conv_out.weight
    out = model(x)
    rec = (out.reconstruction - x).abs().mean()
    g = generator_loss("hinge", discriminator(out.reconstruction))
    weight = adaptive_gan_weight(rec, g, last)
    assert last.grad is None and not weight.requires_grad  # measured without touching .grad, and detached
    norms = []
    for loss in (rec, g):  # the reference: two separate backward passes into .grad
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        norms.append(last.grad.norm().item())
    assert weight.item() == pytest.approx(norms[0] / (norms[1] + 1e-4), rel=1e-10)
    assert adaptive_gan_weight(rec, g, last, max_weight=1e-3).item() == 1e-3  # clamped
    # What it is for: weight * g's gradient at the last layer has the norm of the reconstruction's (up to the 1e-4)
    model.zero_grad(set_to_none=True)
    (weight * g).backward(retain_graph=True)
    assert last.grad.norm().item() == pytest.approx(norms[0], rel=1e-3)


def test_adversarial_losses_hand_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # hinge: relu(1 - real) = [0, 0.5, 2] (mean 5/6), relu(1 + fake) = [0, 1, 2] (mean 1); halved
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert generator_loss("hinge", fake).item() == pytest.approx(1 / 3)
    bce = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones(3)) + F.binary_cross_entropy_with_logits(fake, torch.zeros(3)))
    assert discriminator_loss("non_saturating", real, fake).item() == pytest.approx(bce.item())
    assert generator_loss("non_saturating", fake).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(fake, torch.ones(3)).item())
    with pytest.raises(ValueError, match="unknown adversarial loss"):
        generator_loss("wgan", fake)


# ----------------------------------------------------------------------------------------------------------------
# The discriminator


def test_patch_discriminator_grid_saving_and_bad_input(tmp_path):
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(DiscriminatorConfig(in_channels=3, channels=16, layers=3))
    assert discriminator(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    assert sum(p.numel() for p in discriminator.parameters()) == (  # taming's layout, width 16
        (3 * 16 * 16 + 16) + (16 * 32 * 16 + 64) + (32 * 64 * 16 + 128) + (64 * 128 * 16 + 256) + (128 * 16 + 1))
    with pytest.raises(ValueError, match="too small for a 3-layer discriminator"):
        discriminator(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expects images \[B, 3, H, W\]"):
        discriminator(torch.randn(1, 1, 64, 64))
    discriminator.save_pretrained(tmp_path / "d")
    loaded = vqtok.load(tmp_path / "d")
    assert isinstance(loaded, PatchDiscriminator) and loaded.config == discriminator.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), discriminator.state_dict().values()))


# ----------------------------------------------------------------------------------------------------------------
# LPIPS


def test_lpips_matches_the_lpips_package(peer_lpips, lpips_file):
    ours = LPIPS.from_file(lpips_file)
    torch.manual_seed(1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        expected = peer_lpips(x, y).flatten()
    torch.testing.assert_close(ours(x, y), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(ours(x, x), torch.zeros(3))
    torch.testing.assert_close(ours(y, x), ours(x, y))
    grey = x[:, :1]  # one channel is compared as RGB
    torch.testing.assert_close(ours(grey, y[:, :1]), peer_lpips(grey.expand(-1, 3, -1, -1), y[:, :1].expand(-1, 3, -1, -1)).flatten().detach(),
                               rtol=1e-5, atol=1e-7)


def test_lpips_loading_is_strict(lpips_file, tmp_path):
    tensors = load_file(str(lpips_file))
    save_file({k: v for k, v in tensors.items() if k != "heads.4.weight"}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="missing 1 tensor"):
        LPIPS.from_file(tmp_path / "missing.safetensors")
    save_file({**tensors, "heads.0.weight": -tensors["heads.0.weight"]}, str(tmp_path / "negative.safetensors"))
    with pytest.raises(ValueError, match="non-negative"):
        LPIPS.from_file(tmp_path / "negative.safetensors")
    with pytest.raises(FileNotFoundError, match="vqtok convert-lpips"):
        LPIPS.from_file(tmp_path / "absent.safetensors")


def test_convert_lpips_command(peer_lpips, tmp_path, capsys):
    """`vqtok convert-lpips` makes a file equal to the lpips package's model; an incomplete backbone or an existing
    output is an error naming it, and leaves no file behind; the script in scripts/ is the same command."""
    vgg = {f"features.{k.split('.')[1]}.{k.split('.')[2]}": v for k, v in peer_lpips.net.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's file has the classifier too: dropped
    torch.save(vgg, tmp_path / "vgg16.pth")
    out = tmp_path / "out" / "lpips.safetensors"
    assert main(["convert-lpips", "--vgg", str(tmp_path / "vgg16.pth"), "--out", str(out)]) == 0
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(LPIPS.from_file(out)(x, y), peer_lpips(x, y).flatten().detach(), rtol=1e-5, atol=1e-7)
    written = out.read_bytes()
    assert main(["convert-lpips", "--vgg", str(tmp_path / "vgg16.pth"), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == written  # never overwritten
    del vgg["features.28.bias"]  # an incomplete backbone: an error, and no file left behind
    torch.save(vgg, tmp_path / "broken.pth")
    cmd = [sys.executable, str(ROOT / "scripts" / "convert_lpips_weights.py"), "--vgg", str(tmp_path / "broken.pth"),
           "--heads", str(LPIPS_HEADS), "--out", str(tmp_path / "broken.safetensors")]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1 and "features.28.bias" in result.stderr.splitlines()[-1]
    assert result.stderr.startswith("vqtok convert-lpips: error:")
    assert not list(tmp_path.glob("*broken.safetensors*"))


# ----------------------------------------------------------------------------------------------------------------
# Training with the VQGAN terms


def gan_config(output_dir, lpips_file, **overrides):
    adversarial = AdversarialConfig(discriminator=DiscriminatorConfig(in_channels=1, channels=8, layers=1),
                                    start_step=2)
    return tiny_train_config(str(output_dir), adversarial=adversarial,
                             perceptual=PerceptualConfig(weights=str(lpips_file), weight=0.5), **overrides)


def test_the_two_players_get_only_their_own_gradients_and_see_the_same_discriminator(tmp_path, lpips_file):
    config = gan_config(tmp_path, lpips_file)
    with accelerate_run():
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = Autoencoder(config.model).train()
        losses = ImageLosses(config, accelerator, model)
        losses.prepare()
        x = torch.rand(4, 1, 16, 16) * 2 - 1
        out = model(x)
        recon = F.mse_loss(out.reconstruction, x)
        loss, logs = losses.generator_loss(x, out.reconstruction, recon, step=2)
        # both terms count: reconstruction + perceptual.weight x LPIPS + lambda x L_G
        torch.testing.assert_close(loss, recon + 0.5 * logs["perceptual"] + logs["gan_weight"] * logs["g_loss"])
        assert logs["gan_weight"] > 0 and logs["g_loss"] != 0
        loss.backward()
        assert model.decoder.conv_out.weight.grad is not None
        assert all(p.grad is None for p in losses.raw.parameters())  # the tokenizer's pass trains no discriminator
        model.zero_grad(set_to_none=True)
        d_logs = losses.discriminator_backward(x, out.reconstruction)
        assert all(p.grad is None for p in model.parameters())  # and the discriminator's pass no tokenizer
        assert all(p.grad is not None for p in losses.raw.parameters())
        # The tokenizer is scored by the function the discriminator trains (BatchNorm on the same mixed batch)
        torch.testing.assert_close(logs["g_loss"], -d_logs["logits_fake"])
        assert logs["perceptual"] > 0 and not losses.active(1) and losses.active(2)
        before = {k: v.clone() for k, v in losses.raw.state_dict().items()}
        assert losses.discriminator_step()["d_grad_norm"] > 0  # and it learns
        after = losses.raw.state_dict()
        assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_lpips_sees_minus_one_to_one_whatever_the_model_range(tmp_path, lpips_file):
    config = tiny_train_config(str(tmp_path), perceptual=PerceptualConfig(weights=str(lpips_file)), model=tiny_config(
        VQConfig(codebook_size=16, dim=4), in_channels=1, base_channels=8, norm_groups=4, attn_resolutions=(),
        input_range="0,1"))
    with accelerate_run():
        model = Autoencoder(config.model)
        losses = ImageLosses(config, Accelerator(cpu=True), model)
        x, y = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
        _, logs = losses.generator_loss(x, y, torch.zeros(()), step=0)
        torch.testing.assert_close(logs["perceptual"], losses.perceptual(2 * x - 1, 2 * y - 1).mean())


def test_gan_run_starts_the_discriminator_on_time_and_resumes_exactly(tmp_path, lpips_file, capsys):
    full = train(gan_config(tmp_path / "full", lpips_file))
    lines = metrics_lines(tmp_path / "full")
    assert all("perceptual" in r for r in lines)
    assert [r["step"] for r in lines if "d_loss" in r] == [3, 4, 5, 6]  # steps 2.. (0-based) = logged 3..
    assert all(r["gan_weight"] > 0 for r in lines[2:])
    assert (tmp_path / "full" / "discriminator" / "model.safetensors").is_file()
    discriminator = PatchDiscriminator.from_pretrained(tmp_path / "full" / "discriminator")
    assert main(["eval", str(tmp_path / "full" / "discriminator"), "--data", "digits"]) == 1  # not a tokenizer
    assert "holds a patch_discriminator, not a tokenizer" in capsys.readouterr().err
    assert all("lpips" in r for r in metrics_lines(tmp_path / "full", "eval"))  # the run reports what it optimises
    report = tmp_path / "eval.json"
    assert main(["eval", str(full), "--data", "digits", "--limit", "16", "--lpips", str(lpips_file), "--out",
                 str(report)]) == 0
    tokenizer = vqtok.load(full)
    images = torch.stack([item[0] for item in build_dataset(
        DataConfig(source="digits", split="test", limit=16), channels=1, preprocess=tokenizer.config.preprocess,
        size=None)])
    with torch.no_grad():
        recon = tokenizer.postprocess(tokenizer.decode(tokenizer.encode(tokenizer.preprocess(images)))).float()
        expected = LPIPS.from_file(lpips_file)(recon / 127.5 - 1, images.float() / 127.5 - 1).mean().item()
    assert json.loads(report.read_text())["lpips"] == pytest.approx(expected, rel=1e-4)

    config = gan_config(tmp_path / "split", lpips_file)
    assert train(config, stop_at=3) is None  # mid-GAN: the discriminator and its optimizer are in the checkpoint
    resumed = train(config, resume=True)
    losses = lambda run: [(r["step"], r["loss"], r.get("d_loss")) for r in metrics_lines(run)]  # noqa: E731
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    d = load_file(tmp_path / "split" / "discriminator" / "model.safetensors")
    assert all(torch.equal(d[k], v) for k, v in discriminator.state_dict().items())
    set_seed(0)  # the run's initialisation of the discriminator (after the tokenizer's), which it moved away from
    Autoencoder(config.model)
    fresh = build_discriminator(config).state_dict()
    assert not any(torch.equal(fresh[k], v) for k, v in discriminator.state_dict().items() if k.endswith("weight"))
    checkpoint = tmp_path / "split" / "checkpoints" / "step_000006"
    assert load_file(checkpoint / "model.safetensors").keys() == a.keys()  # the checkpoint's first model: the tokenizer


def test_fine_tuning_starts_from_the_saved_tokenizer_and_discriminator(tmp_path, lpips_file):
    first = train(gan_config(tmp_path / "first", lpips_file, max_steps=3, eval_every=3))
    saved_d = tmp_path / "first" / "discriminator"
    config = gan_config(tmp_path / "tune", lpips_file, init_from=str(first))
    config = type(config)(**{**config.__dict__, "adversarial": AdversarialConfig(
        discriminator=config.adversarial.discriminator, start_step=0, init_from=str(saved_d))})
    model, discriminator = initial_model(config), build_discriminator(config)
    assert model.training and discriminator.training
    for loaded, folder in ((model, first), (discriminator, saved_d)):
        saved = load_file(folder / "model.safetensors")
        assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    first_loss = metrics_lines(tmp_path / "first")[0]["recon"]
    config = type(config)(**{**config.__dict__, "grad_accum": 2})  # the discriminator's no_sync path too
    train(config)
    assert metrics_lines(tmp_path / "tune")[0]["recon"] < first_loss  # it did not start from scratch
    other = gan_config(tmp_path / "x", lpips_file, init_from=str(first), model=tiny_config(
        WORLD_INVARIANT_VQ, in_channels=1, base_channels=8, norm_groups=4, attn_resolutions=()))
    with pytest.raises(ConfigError, match="differs from model in .*bottleneck"):
        initial_model(other)
    wider = AdversarialConfig(discriminator=DiscriminatorConfig(in_channels=1, channels=16, layers=1),
                              init_from=str(saved_d))
    with pytest.raises(ConfigError, match="adversarial.init_from"):
        build_discriminator(type(config)(**{**config.__dict__, "adversarial": wider}))


def test_vqgan_config_errors(tmp_path, lpips_file):
    with pytest.raises(ConfigError, match="in_channels .* must equal model.in_channels"):
        tiny_train_config(str(tmp_path), adversarial=AdversarialConfig())  # 3-channel D, 1-channel digits
    with pytest.raises(ConfigError, match="weights is required"):
        PerceptualConfig(weight=1.0)
    with pytest.raises(ConfigError, match="weight must be finite and > 0"):
        AdversarialConfig(weight=0.0)
    bernoulli = tiny_config(VQConfig(codebook_size=16, dim=4), in_channels=1, base_channels=8, norm_groups=4,
                            attn_resolutions=(), input_range="0,1", decoder_output="bernoulli_logits")
    with pytest.raises(ConfigError, match="perceptual compare images"):
        tiny_train_config(str(tmp_path), model=bernoulli, loss="bernoulli",
                          perceptual=PerceptualConfig(weights=str(lpips_file)))
    with pytest.raises(ConfigError, match="start_step .* must be below max_steps"):
        gan_config(tmp_path, lpips_file, max_steps=2)
    with pytest.raises(ConfigError, match="2-layer discriminator needs images of at least 12"):
        tiny_train_config(str(tmp_path), adversarial=AdversarialConfig(
            discriminator=DiscriminatorConfig(in_channels=1, layers=2)), model=tiny_config(
            VQConfig(codebook_size=16, dim=4), in_channels=1, base_channels=8, norm_groups=4, attn_resolutions=(),
            resolution=8))
    with pytest.raises(ConfigError, match="at least 16 pixels a side"):
        tiny_train_config(str(tmp_path), perceptual=PerceptualConfig(weights=str(lpips_file)), model=tiny_config(
            VQConfig(codebook_size=16, dim=4), in_channels=1, base_channels=8, norm_groups=4, attn_resolutions=(),
            resolution=8))
    with pytest.raises(ValueError, match="at least 16 pixels a side"):
        LPIPS()(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="fp16"):
        gan_config(tmp_path / "fp16", lpips_file, mixed_precision="fp16")


@pytest.mark.slow
def test_gan_run_on_two_processes(tmp_path):
    """Two ranks with DDP over both the tokenizer and the discriminator (the adaptive weight's autograd.grad inside
    DDP's pass): both ranks end with the same weights of both, and really were two."""
    run_two_ranks(tmp_path, GAN="1")
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for name in ranks[0]:
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)
    discriminators = [load_file(tmp_path / f"discriminator_rank{r}.safetensors") for r in range(2)]
    for name, tensor in discriminators[0].items():
        if "running" not in name and "num_batches" not in name:  # BatchNorm statistics are per rank
            torch.testing.assert_close(tensor, discriminators[1][name], rtol=0, atol=0, msg=name)
    assert any("d_loss" in r for r in metrics_lines(tmp_path / "run"))
