"""The Hub format: save -> load is bit-identical; offline Hub cache by repo id; strict, pickle-free loading."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

import vqtok
from vqtok import Autoencoder, ConfigError


@pytest.fixture(scope="module")
def saved_vq(vq_model, tmp_path_factory, images):
    model = Autoencoder(vq_model.config)
    model.load_state_dict(vq_model.state_dict())
    model.train()
    model(images)
    model.on_optimizer_step()  # k-means init: non-default buffers must survive the round trip too
    model(images)
    model.on_optimizer_step()
    path = tmp_path_factory.mktemp("saved") / "vq"
    model.eval().save_pretrained(path)
    return model, path


def _copy(path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(path, tmp_path / "copy"))


def test_roundtrip_is_bit_identical_vq(saved_vq, images):
    model, path = saved_vq
    loaded = vqtok.load(path)
    assert type(loaded) is Autoencoder and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    codes = model.encode(images)
    assert torch.equal(codes, loaded.encode(images))
    assert torch.equal(model.decode(codes), loaded.decode(codes))
    assert model.bottleneck.codebook_stats().keys() == loaded.bottleneck.codebook_stats().keys()
    for key, value in model.bottleneck.codebook_stats().items():
        assert torch.equal(value, loaded.bottleneck.codebook_stats()[key]), key


def test_roundtrip_is_bit_identical_gaussian(gaussian_model, tmp_path, images):
    gaussian_model.save_pretrained(tmp_path)
    loaded = Autoencoder.from_pretrained(tmp_path)
    a, b = gaussian_model.encode(images), loaded.encode(images)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.logvar, b.logvar)
    assert torch.equal(gaussian_model.decode(a.mode()), loaded.decode(b.mode()))


def test_saved_folder_layout(saved_vq):
    _, path = saved_vq
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "autoencoder" and config["vqtok_version"] == vqtok.__version__
    assert config["downsampling_factor"] == 2 and config["latent_grid"] == [8, 8] and config["vocab_size"] == 32
    assert config["input_range"] == "-1,1" and config["resolution"] == 16
    card = (path / "README.md").read_text()
    assert "library_name: vqtok" in card and "vocab size | 32" in card


def _hub_cache(root: Path, repo_id: str, folder: Path, sha: str) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/files}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return root


LOAD_BY_ID = """
import sys, torch, vqtok
model = vqtok.load(sys.argv[1])
ref = vqtok.load(sys.argv[2])
x = torch.rand(2, 3, 16, 16) * 2 - 1
assert torch.equal(model.encode(x), ref.encode(x))
print("OK", type(model).__name__)
"""


def test_load_by_repo_id_from_offline_hub_cache(saved_vq, tmp_path):
    _, path = saved_vq
    sha = "a" * 40
    cache = _hub_cache(tmp_path / "hub", "org/tiny-vq", path, sha)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for name in ["org/tiny-vq", f"org/tiny-vq@{sha}"]:
        result = subprocess.run(
            [sys.executable, "-c", LOAD_BY_ID, name, str(path)], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "OK Autoencoder" in result.stdout


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_weights_that_do_not_match_fail(saved_vq, tmp_path, change):
    _, path = saved_vq
    path = _copy(path, tmp_path)
    tensors = load_file(path / "model.safetensors")
    if change == "missing":
        del tensors["decoder.conv_out.bias"]
        match = "missing 1 tensor.*decoder.conv_out.bias"
    elif change == "extra":
        tensors["encoder.extra"] = torch.zeros(1)
        match = "unexpected 1 tensor.*encoder.extra"
    else:
        tensors["bottleneck.codebook"] = torch.zeros(31, 4)
        match = "bottleneck.codebook' has shape"
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        vqtok.load(path)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["VQTOK_PICKLE_MARKER"]),))


def test_pickle_only_folder_is_refused_without_unpickling(saved_vq, tmp_path, monkeypatch):
    _, path = saved_vq
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(path / "config.json", folder / "config.json")
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("VQTOK_PICKLE_MARKER", str(marker))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ValueError, match="never unpickles"):
        vqtok.load(folder)
    assert not marker.exists()
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # the file really would have run code
    assert marker.exists()


def _edit_config(path: Path, tmp_path: Path, edit) -> Path:
    path = _copy(path, tmp_path)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(model_type="diffusion"), "unknown model_type 'diffusion'"),
        (lambda c: c.pop("model_type"), "unknown model_type None"),
        (lambda c: c.update(vqtok_version="99.0.0"), "newer than the installed"),
        (lambda c: c.update(vqtok_version="banana"), "vqtok_version' is missing or invalid"),
        (lambda c: c.update(base_channel=16), "unknown key.*'base_channel'"),
        (lambda c: c["bottleneck"].update(codebook_size="many"), "'bottleneck.codebook_size' must be an integer"),
        (lambda c: c.update(downsampling_factor=8), "'downsampling_factor' is 8 but the config implies 2"),
    ],
)
def test_bad_config_json_is_a_clear_error(saved_vq, tmp_path, edit, match):
    _, path = saved_vq
    with pytest.raises(ConfigError, match=match):
        vqtok.load(_edit_config(path, tmp_path, edit))


def test_malformed_json_and_missing_files(saved_vq, tmp_path):
    _, path = saved_vq
    broken = _copy(path, tmp_path)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        vqtok.load(broken)
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vqtok.load(broken)
    truncated = Path(shutil.copytree(path, tmp_path / "truncated"))
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        vqtok.load(truncated)


def test_save_replaces_files_atomically(saved_vq, tmp_path):
    model, path = saved_vq
    target = _copy(path, tmp_path)
    with mock.patch("vqtok.hub.save_file", side_effect=RuntimeError("disk full")):
        with pytest.raises(RuntimeError, match="disk full"):
            model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # no temps
    assert (target / "config.json").read_bytes() == (path / "config.json").read_bytes()
    assert (target / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_push_to_hub_uploads_the_saved_folder(saved_vq):
    model, _ = saved_vq
    uploaded = {}

    def upload_folder(**kwargs):
        uploaded["files"] = sorted(os.listdir(kwargs["folder_path"]))
        uploaded["config"] = json.loads((Path(kwargs["folder_path"]) / "config.json").read_text())
        return "https://huggingface.co/org/tiny/commit/1"

    with mock.patch("huggingface_hub.hub_mixin.HfApi") as api:
        api.return_value.create_repo.return_value.repo_id = "org/tiny"
        api.return_value.upload_folder.side_effect = upload_folder
        model.push_to_hub("org/tiny")
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["config"]["model_type"] == "autoencoder"


def test_saved_files_are_readable_by_others_and_the_card_follows_the_metrics(saved_vq, tmp_path):
    model, _ = saved_vq
    old_umask = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path, model_card_kwargs={"metrics": {"psnr": 1.0}})
        model.save_pretrained(tmp_path, model_card_kwargs={"metrics": {"psnr": 99.0}})
    finally:
        os.umask(old_umask)
    assert {(tmp_path / f).stat().st_mode & 0o777 for f in ("config.json", "model.safetensors")} == {0o644}
    card = (tmp_path / "README.md").read_text()
    assert "| psnr | 99.0 |" in card and "| psnr | 1.0 |" not in card
    (tmp_path / "README.md").write_text("# my own card\n")  # a card a person wrote is kept
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"


def test_a_tensor_of_the_wrong_dtype_fails(saved_vq, tmp_path):
    _, path = saved_vq
    path = _copy(path, tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["bottleneck.last_used"] = tensors["bottleneck.last_used"].float()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="'bottleneck.last_used' is torch.float32, the model expects torch.int64"):
        vqtok.load(path)


def test_repo_missing_from_the_offline_cache_says_so(tmp_path):
    code = "import vqtok; vqtok.load('org/absent')"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not in the local Hub cache" in result.stderr


# ---- local paths and Hub repo ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, reason", [
    ("runs/mytokenizer",
     "runs/ is a local folder; for the Hub repo of that name give a revision, runs/mytokenizer@main"),
    ("mytokenizer", "a Hub repo id has the form org/name"),
    ("runs/exp/tokenizer", "a Hub repo id has the form org/name"),
    ("./mytokenizer", "it is written as a path"),
    ("~/mytokenizer", "it is written as a path"),
    ("/abs/mytokenizer", "it is written as a path"),
    ("org/model.safetensors", "it ends in a file suffix"),
    ("org/na--me", "not a valid Hub repo id"),
])
def test_a_name_that_can_only_be_a_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, name, reason):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with mock.patch("vqtok.hub.hf_hub_download", side_effect=AssertionError("asked the Hub")):
        with pytest.raises(FileNotFoundError) as error:
            vqtok.load(name)
    assert str(error.value) == f"no local folder {name} (not looked up on the Hub: {reason})"


def test_an_org_name_id_goes_to_the_hub_and_its_error_says_there_is_no_local_folder(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    asked = []

    def offline(**kwargs):
        asked.append((kwargs["repo_id"], kwargs["revision"]))
        raise LocalEntryNotFoundError("offline")

    with mock.patch("vqtok.hub.hf_hub_download", side_effect=offline):
        for name in ("org/absent", "runs/mytokenizer@main"):
            with pytest.raises(FileNotFoundError, match="no local folder of that name, and the Hub repo's config.json"):
                vqtok.load(name)
    assert asked == [("org/absent", None), ("runs/mytokenizer", "main")]


def test_offline_a_mistyped_local_path_fails_at_once_naming_it(tmp_path):
    (tmp_path / "runs").mkdir()
    code = ("import vqtok\nfor name in ['runs/mytokenizer', 'org/absent']:\n    try:\n        vqtok.load(name)\n"
            "    except FileNotFoundError as e:\n        print(e)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "no local folder runs/mytokenizer (not looked up on the Hub: runs/ is a local folder; for the Hub repo of that "
        "name give a revision, runs/mytokenizer@main)",
        "org/absent: no local folder of that name, and the Hub repo's config.json is not in the local Hub cache and "
        "the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1?)",
    ]


def test_a_key_given_twice_in_config_json_is_an_error(saved_vq, tmp_path):
    _, path = saved_vq
    path = _copy(path, tmp_path)
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text.replace('"base_channels": 16,', '"base_channels": 16, "base_channels": 32,'))
    with pytest.raises(ConfigError, match=r"config.json: key 'base_channels' is given twice"):
        vqtok.load(path)
