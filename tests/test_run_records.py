"""What a training run records and whom it tells: the mixed precision Accelerate chose, run_info.json, a codebook that
never initialised, counts as integers, the trackers of `log_with`, and a user's own Dataset (`train(dataset=...)`)."""

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.tracking import GeneralTracker
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import vqtok
from tests.scripts.common import tiny_train_config
from vqtok.cli import main
from vqtok.config import (
    AdversarialConfig,
    ConfigError,
    DataConfig,
    DiscriminatorConfig,
    PreprocessConfig,
    PriorConfig,
    PriorTrainConfig,
    VQConfig,
    load_yaml,
)
from vqtok.data import build_dataset, encode_dataset
from vqtok.train import RunFolderError, train
from vqtok.train.engine import accelerate_run, has_accelerator, make_accelerator, resolve_precision
from vqtok.train.evaluate import MIN_CODE_USAGE, codebook_warnings, evaluate
from vqtok.train.prior import train_prior
from vqtok.train.run_info import PACKAGE_DIR, git_state

UNREACHABLE_KMEANS = VQConfig(codebook_size=16, dim=4, kmeans_samples=100_000)  # 3 steps gather 3 x 16 x 64 vectors


class RecordingTracker(GeneralTracker):
    """An Accelerate tracker that keeps what it is given."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.hyperparameters, self.logs, self.images, self.finished = None, [], [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.hyperparameters = dict(values)

    def log(self, values, step=None, **kwargs):
        self.logs.append((step, dict(values)))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, values))

    def finish(self):
        self.finished = True


def run_info(out: Path) -> list[dict]:
    return json.loads((out / "run_info.json").read_text())["runs"]


# ---- mixed precision: the config's value, else Accelerate's ------------------------------------------------------


def test_unset_mixed_precision_follows_accelerate_and_an_explicit_value_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    unset = tiny_train_config(str(tmp_path / "a"))
    assert unset.mixed_precision is None
    with accelerate_run():
        accelerator = make_accelerator(unset, tmp_path / "a")
        assert accelerator.mixed_precision == "bf16"
        assert resolve_precision(unset, accelerator).mixed_precision == "bf16"
    explicit = tiny_train_config(str(tmp_path / "b"), mixed_precision="no")
    with accelerate_run():
        accelerator = make_accelerator(explicit, tmp_path / "b")
        assert accelerator.mixed_precision == "no"  # an argument to Accelerator wins over its environment
        assert resolve_precision(explicit, accelerator).mixed_precision == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with accelerate_run():
        assert resolve_precision(unset, make_accelerator(unset, tmp_path / "a")).mixed_precision == "no"


def test_a_precision_from_accelerate_is_checked_as_the_configs_would_be(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    gan = tiny_train_config(str(tmp_path), adversarial=AdversarialConfig(
        discriminator=DiscriminatorConfig(in_channels=1, layers=2)))
    with accelerate_run(), pytest.raises(ConfigError,
                                         match="fp16' with an adversarial term.*ACCELERATE_MIXED_PRECISION"):
        resolve_precision(gan, make_accelerator(gan, tmp_path))
    if not has_accelerator():
        with accelerate_run(), pytest.raises(ValueError, match="fp16' \\(from Accelerate's setting.*needs a GPU"):
            resolve_precision(tiny_train_config(str(tmp_path)), make_accelerator(tiny_train_config(str(tmp_path)),
                                                                                 tmp_path))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with accelerate_run(), pytest.raises(ValueError, match="'fp8'.*not supported by vqtok"):
        config = tiny_train_config(str(tmp_path))
        resolve_precision(config, make_accelerator(config, tmp_path))


# ---- run_info.json ---------------------------------------------------------------------------------------------------


def test_a_run_records_what_made_it_and_each_resume(tmp_path, monkeypatch):
    """Versions, git commit, command line, processes, device and the precision Accelerate chose (no YAML value,
    bf16 from the environment), in run_info.json and config.yaml; a resume appends a record and keeps the first; a
    resume under another precision is refused, since the run recorded what it used."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "run"
    config = tiny_train_config(str(out), max_steps=3, eval_images=8)
    assert train(config, stop_at=2) is None
    [first] = run_info(out)
    expected_git = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True,
                                  text=True).stdout.strip() if (PACKAGE_DIR.parent / ".git").exists() else None
    assert (first["git"] or {}).get("commit") == (expected_git or None)
    assert first["vqtok"] == vqtok.__version__ and first["torch"] == torch.__version__
    assert first["python"] == ".".join(map(str, sys.version_info[:3]))
    assert first["command"] == sys.argv and first["processes"] == 1 and first["device"] in ("cpu", "cuda", "mps")
    assert first["mixed_precision"] == "bf16" and first["start_step"] == 0 and first["user_dataset"] is None
    assert first["started_utc"].endswith("+00:00")
    assert load_yaml(out / "config.yaml", type(config)).mixed_precision == "bf16"

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(RunFolderError, match="mixed_precision: 'bf16' -> 'no'"):
        train(config, resume=True)
    assert run_info(out) == [first]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    train(config, resume=True)
    records = run_info(out)
    assert records[0] == first and len(records) == 2 and records[1]["start_step"] == 2


def test_git_state_only_for_a_checkout_that_tracks_the_package(tmp_path):
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert git_state(package) is None  # not a git checkout
    git = ["git", "-C", str(tmp_path / "repo"), "-c", "user.name=t", "-c", "user.email=t@t"]
    try:
        subprocess.run([*git, "init", "-q"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git")
    (tmp_path / "repo" / "other.txt").write_text("")
    subprocess.run([*git, "add", "other.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "other"], check=True)
    assert git_state(package) is None  # a repository that does not track the package (e.g. a venv inside one)
    subprocess.run([*git, "add", "pkg/__init__.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(package) == {"commit": head, "dirty": False}
    (package / "__init__.py").write_text("changed = True\n")
    assert git_state(package) == {"commit": head, "dirty": True}


# ---- a codebook that never initialised ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninitialised_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninit") / "run"
    handler = _Capture()
    logging.getLogger("vqtok").addHandler(handler)
    try:
        folder = train(tiny_train_config(str(out), vq=UNREACHABLE_KMEANS, max_steps=3, eval_images=8))
    finally:
        logging.getLogger("vqtok").removeHandler(handler)
    return out, folder, handler.records


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_an_uninitialised_codebook_is_exported_with_a_loud_warning(uninitialised_run, tmp_path, capsys):
    out, folder, records = uninitialised_run
    [warning] = [r for r in records if r.levelno == logging.WARNING]
    assert "never initialised" in warning.getMessage() and "100,000" in warning.getMessage()
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["codebook_initialized"] is False and final["train_code_usage"] is None  # no step reached the EMA
    assert not bool(vqtok.load(folder).bottleneck.initialized)
    capsys.readouterr()
    assert main(["info", str(folder)]) == 0
    shown = capsys.readouterr()
    assert '"initialized": false' in shown.out and '"usage": 0.0' in shown.out and "never initialised" in shown.err
    assert main(["eval", str(folder), "--data", "digits", "--limit", "16"]) == 0
    assert re.search(r"codebook_initialized\s+False", capsys.readouterr().out)
    # a codebook without k-means and without vqtok training (as converted ones are): nothing to warn about
    config = tiny_train_config("unused", vq=VQConfig(codebook_size=16, dim=4, kmeans_init=False)).model
    vqtok.Autoencoder(config).save_pretrained(tmp_path / "converted")
    assert main(["info", str(tmp_path / "converted")]) == 0
    shown = capsys.readouterr()
    assert '"initialized": true' in shown.out and "warning" not in shown.err

    # the same run with a reservoir that 3 steps fill: initialised, most codes in use, no warning
    healthy = train(tiny_train_config(str(tmp_path / "ok"), max_steps=3, eval_images=8))
    final = json.loads((tmp_path / "ok" / "final_metrics.json").read_text())
    assert final["codebook_initialized"] is True and final["train_code_usage"] >= MIN_CODE_USAGE
    assert codebook_warnings({"codebook_initialized": True, "train_code_usage": final["train_code_usage"]},
                             vqtok.load(healthy).config.bottleneck) == []


def test_a_barely_used_codebook_is_warned_about_below_the_threshold():
    vq = VQConfig(codebook_size=1024)
    low = {"codebook_initialized": True, "train_code_usage": MIN_CODE_USAGE - 0.01}
    [warning] = codebook_warnings(low, vq, 10)
    assert "barely used" in warning and "1024 codes" in warning
    assert codebook_warnings({**low, "train_code_usage": MIN_CODE_USAGE}, vq) == []
    assert codebook_warnings({**low, "train_code_usage": None}, vq) == []  # no training recorded (converted)
    assert codebook_warnings({}, vq) == []  # not a VQ tokenizer


# ---- counts are integers --------------------------------------------------------------------------------------------


def test_counts_in_metrics_are_integers(uninitialised_run, gaussian_model):
    out, _, _ = uninitialised_run
    final = json.loads((out / "final_metrics.json").read_text())
    assert type(final["images"]) is int and final["images"] == 8
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["split"] == "train"]
    assert all(type(r["skipped_total"]) is int for r in train_lines)
    assert all(type(r["images"]) is int for r in lines if r["split"] == "eval")
    images = torch.randint(0, 256, (6, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    metrics = evaluate(gaussian_model, TensorDataset(images, torch.zeros(6, dtype=torch.long)))
    assert all(type(metrics[k]) is int for k in ("images", "active_units", "latent_units"))
    assert type(metrics["psnr"]) is float


# ---- trackers (log_with) --------------------------------------------------------------------------------------------


def test_trackers_get_the_hyperparameters_metrics_and_image_grids(tmp_path):
    tracker = RecordingTracker()
    out = tmp_path / "run"
    train(tiny_train_config(str(out), max_steps=3, eval_images=8), trackers=[tracker])
    hp = tracker.hyperparameters
    assert hp["lr"] == 1e-3 and hp["model.bottleneck.codebook_size"] == 16 and hp["data.source"] == "digits"
    assert hp["betas"] == "[0.9, 0.99]" and hp["mixed_precision"] == "no" and hp["skip_grad_norm"] == "null"
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())
    assert [step for step, values in tracker.logs if "train/loss" in values] == [1, 2, 3]
    [(step, grids)] = tracker.images
    expected = np.asarray(Image.open(out / "samples" / "step_000003.png").convert("RGB"))
    assert step == 3 and np.array_equal(grids["eval/reconstructions"][0], expected)
    assert tracker.finished


def test_log_with_names_a_tracker_accelerate_has(tmp_path):
    for name, match in (("nonesuch", "'nonesuch' is not a tracker Accelerate knows"),
                        ("tensorboard", "'tensorboard' tracker's package is not installed")):
        if name == "tensorboard" and _installed("tensorboard"):
            continue
        with pytest.raises(ValueError, match=match):
            train(tiny_train_config(str(tmp_path / name), log_with=[name]))
        assert not (tmp_path / name).exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="names a tracker twice"):
        tiny_train_config(str(tmp_path), log_with=["wandb", "wandb"])


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_tensorboard_gets_the_image_grids(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(tiny_train_config(str(out), max_steps=3, eval_images=8, log_with=["tensorboard"]))
    assert any((out / "vqtok").rglob("events.out.tfevents.*"))


# ---- a user's own Dataset -------------------------------------------------------------------------------------------


class Digits(Dataset):
    """The built-in digits as a user would hand them over: float images in [0, 1], each 0.3 levels below the 8-bit
    value it rounds to, and a label."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return (self.images[index].float() - 0.3).clamp(min=0) / 255.0, 7


def test_a_user_dataset_trains_exactly_as_the_same_images_from_the_config(tmp_path):
    """The digits given as a TensorDataset (uint8, with labels) and as a float Dataset give the weights the config's
    own digits give, and a run on a user dataset stopped and resumed ends exactly as the uninterrupted one."""
    reference = tiny_train_config(str(tmp_path / "config_data"), max_steps=3, eval_images=8)
    source = build_dataset(reference.data, channels=1, preprocess=PreprocessConfig(resize=16), size=16)
    images = torch.stack([source[i][0] for i in range(len(source))])
    expected = load_file(train(reference) / "model.safetensors")

    user = replace(reference, data=DataConfig())  # the dataset replaces config.data, left at its default
    uint8_run = train(replace(user, output_dir=str(tmp_path / "uint8")),
                      dataset=TensorDataset(images, torch.arange(len(images))))
    for name, tensor in load_file(uint8_run / "model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name
    [record] = run_info(tmp_path / "uint8")
    assert record["user_dataset"] == f"user dataset TensorDataset, {len(images)} items"
    assert "# data: a user dataset TensorDataset" in (tmp_path / "uint8" / "config.yaml").read_text()

    stopped = replace(user, output_dir=str(tmp_path / "float"))
    assert train(stopped, dataset=Digits(images), stop_at=2) is None
    with pytest.raises(RunFolderError, match="trained on a user dataset Digits.*given none"):
        train(stopped, resume=True)
    with pytest.raises(RunFolderError, match="user dataset Digits, 256 items, but this run is given user dataset "
                                             "Digits, 255 items"):
        train(stopped, dataset=Digits(images[:-1]), resume=True)
    resumed = train(stopped, dataset=Digits(images), resume=True)
    for name, tensor in load_file(resumed / "model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1, 16, 16, dtype=torch.uint8)


@pytest.mark.parametrize("dataset, error, match", [
    (TensorDataset(torch.zeros(4, 3, 16, 16, dtype=torch.uint8)), ValueError,
     r"dataset item 0: the image has shape \[3, 16, 16\]; the model trains on \[1, 16, 16\]"),
    (TensorDataset(torch.full((4, 1, 16, 16), 2.0)), ValueError, r"item 0: a floating-point image must lie in \[0, 1\]"),
    (TensorDataset(torch.zeros(4, 1, 16, 16, dtype=torch.int64)), TypeError, "give uint8"),
    ([np.zeros((1, 16, 16), np.uint8)] * 4, TypeError, "the image is a ndarray; give a torch tensor"),
    (Stream(), TypeError, "not a map-style Dataset"),
])
def test_a_user_dataset_that_does_not_fit_the_model_is_refused_naming_the_item(tmp_path, dataset, error, match):
    with pytest.raises(error, match=match):
        train(tiny_train_config(str(tmp_path / "run"), max_steps=1, data=DataConfig()), dataset=dataset)
    assert not (tmp_path / "run").exists()


def test_a_dataset_and_a_data_section_together_are_refused(tmp_path):
    config = tiny_train_config(str(tmp_path / "run"), max_steps=1)  # data: digits, limit 256
    with pytest.raises(ValueError, match="a dataset was given and config.data is set too"):
        train(config, dataset=TensorDataset(torch.zeros(4, 1, 16, 16, dtype=torch.uint8)))
    assert not (tmp_path / "run").exists()


# ---- the prior's run ------------------------------------------------------------------------------------------------


def test_a_prior_run_records_its_run_logs_to_trackers_and_counts_in_integers(tmp_path):
    torch.manual_seed(0)
    tokenizer = vqtok.Autoencoder(tiny_train_config("unused", vq=VQConfig(codebook_size=16, dim=4,
                                                                           kmeans_init=False)).model)
    tokenizer.save_pretrained(tmp_path / "tok")
    encode_dataset(str(tmp_path / "tok"), DataConfig(source="digits", limit=40), tmp_path / "store", num_workers=0,
                   progress=False)
    tracker = RecordingTracker()
    out = tmp_path / "prior"
    config = PriorTrainConfig(prior=PriorConfig(n_layer=1, n_head=2, n_embd=16), tokens=str(tmp_path / "store"),
                              output_dir=str(out), max_steps=2, batch_size=8, warmup_steps=1, eval_every=2,
                              log_every=1, num_samples=4)
    train_prior(config, trackers=[tracker])
    [record] = run_info(out)
    assert record["mixed_precision"] == "no" and record["processes"] == 1 and record["start_step"] == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert {k: type(final[k]) for k in ("held_out_images", "steps", "processes")} == dict.fromkeys(
        ("held_out_images", "steps", "processes"), int)
    assert final["held_out_images"] == 2 and final["steps"] == 2  # 5% of 40 images held out
    assert tracker.hyperparameters["prior.n_embd"] == 16 and [s for s, _ in tracker.images] == [2]
    assert tracker.finished and os.path.isfile(out / "config.yaml")
