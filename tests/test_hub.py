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
import torch.nn.functional as F
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
        uploaded["card"] = (Path(kwargs["folder_path"]) / "README.md").read_text()
        return "https://huggingface.co/org/tiny/commit/1"

    with mock.patch("vqtok.hub.HfApi") as api:
        api.return_value.create_repo.return_value.repo_id = "org/tiny"  # the Hub puts a bare name in your namespace
        api.return_value.upload_folder.side_effect = upload_folder
        model.push_to_hub("tiny", model_card_kwargs={"metrics": {"psnr": 12.5}})
    assert api.return_value.create_repo.call_args.kwargs["repo_id"] == "tiny"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["config"]["model_type"] == "autoencoder"
    assert 'model = vqtok.load("org/tiny")' not in uploaded["card"]  # (the old snippet's form)
    assert 'tok = vqtok.load("org/tiny")' in uploaded["card"] and "ORG/NAME" not in uploaded["card"]
    assert "| psnr | 12.5 |" in uploaded["card"]
    with pytest.raises(ValueError, match="names the repo 'other/repo' but the model is pushed to 'org/tiny'"):
        with mock.patch("vqtok.hub.HfApi") as api:
            api.return_value.create_repo.return_value.repo_id = "org/tiny"
            model.push_to_hub("tiny", model_card_kwargs={"repo_id": "other/repo"})
    api.return_value.upload_folder.assert_not_called()


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
    from huggingface_hub.utils import LocalEntryNotFoundError

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


# ---- model cards in the Hub's conventions ------------------------------------------------------------------------


def _tiny_prior_and_hvae():
    from tests.conftest import tiny_config
    from vqtok import HierarchicalVAE, HierarchicalVAEConfig, PriorConfig, TransformerPrior, VQConfig
    from vqtok.models.prior import tokenizer_ref

    torch.manual_seed(0)
    tok = Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4, kmeans_init=False), in_channels=1)).eval()
    prior = TransformerPrior(PriorConfig(vocab_size=16, grid=(8, 8), num_classes=10, tokenizer=tokenizer_ref(tok),
                                         n_layer=1, n_head=2, n_embd=16)).eval()
    prior.attach_tokenizer(tok)
    hvae = HierarchicalVAE(HierarchicalVAEConfig(in_channels=1, resolution=8, scales=(4, 2), groups_per_scale=(1, 1),
                                                 latent_channels=2, width=8, encoder_cells=1, cells_per_group=1))
    return prior, hvae


def _card(text: str):
    from huggingface_hub import ModelCard

    return ModelCard(text)  # huggingface_hub's own parser of the YAML header, model-index included


def test_the_card_header_follows_the_hub_conventions(saved_vq, tmp_path):
    model, _ = saved_vq
    metrics = {"psnr": 21.25, "ssim": 0.75, "images": 40.0, "code_usage": 0.5}
    model.save_pretrained(tmp_path, model_card_kwargs={
        "metrics": metrics, "license": "mit", "datasets": ["ylecun/mnist"], "eval_dataset": "MNIST (test split)"})
    text = (tmp_path / "README.md").read_text()
    data = _card(text).data
    assert data.library_name == "vqtok" and data.license == "mit" and data.datasets == ["ylecun/mnist"]
    assert data.tags == ["vqtok", "image-tokenizer", "vq-vae"] and data.to_dict().get("pipeline_tag") is None
    # every measurement in the model-index, on the named data; the count of images measured is not a metric
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"psnr": 21.25, "ssim": 0.75, "code_usage": 0.5}
    assert {(r.task_type, r.dataset_type, r.dataset_name) for r in data.eval_results} == {
        ("image-to-image", "ylecun/mnist", "MNIST (test split)")}
    assert "| images | 40.0 |" in text  # ... but it is in the table
    assert "A VQ image tokenizer made with" in text and "A autoencoder" not in text
    for section in ("## Usage", "## Model", "## Measured", "## Intended use", "## Limitations", "## Files"):
        assert f"\n{section}\n" in text, section
    assert f'tok = vqtok.load("{tmp_path}")' in text  # a local save loads from its folder
    plain = model.generate_model_card()  # no licence, data or metrics given: none claimed
    assert plain.data.license is None and plain.data.datasets is None and plain.data.eval_results is None
    assert "## Measured" not in str(plain) and 'vqtok.load("ORG/NAME")' in str(plain)
    with pytest.raises(TypeError, match="unknown model card keyword.*licence"):
        model.generate_model_card(licence="mit")


def test_each_kind_of_model_has_its_tags_pipeline_and_usage(gaussian_model):
    from tests.conftest import tiny_config
    from vqtok import GaussianConfig

    prior, hvae = _tiny_prior_and_hvae()
    latent_tokenizer = Autoencoder(tiny_config(GaussianConfig(dim=4, beta=1e-6)))
    expected = [  # (model, kind's tags, pipeline_tag, what the usage does, the article and description)
        (gaussian_model, ["image-tokenizer", "vae"], "unconditional-image-generation", "tok.sample(16",
         "A Gaussian (KL) image autoencoder"),
        (latent_tokenizer, ["image-tokenizer", "vae"], None, "posterior.mode()", "A Gaussian (KL) image autoencoder"),
        (hvae, ["image-tokenizer", "vae", "hierarchical-vae"], "unconditional-image-generation", "vae.sample(16",
         "A hierarchical VAE"),
        (prior, ["autoregressive-prior"], "unconditional-image-generation",
         "prior.generate(16, labels=3, cfg_scale=2.0, seed=0)", "An autoregressive transformer prior"),
    ]
    for model, tags, pipeline, usage, intro in expected:
        card = model.generate_model_card(repo_id="org/name", metrics={"bits": 1.5})
        assert card.data.tags == ["vqtok", *tags] and card.data.to_dict().get("pipeline_tag") == pipeline, type(model)
        text = str(card)
        assert usage in text and 'vqtok.load("org/name")' in text and intro in text, (type(model), text)
        assert "\n## Intended use\n" in text and "\n## Limitations\n" in text
        assert card.data.eval_results[0].task_type == type(model).card_task[0]
    assert "`tokenizer/`: the tokenizer whose codes it models" in str(prior.generate_model_card())


def test_push_to_hub_of_a_prior_names_the_repo_in_its_tokenizer_card_too():
    prior, _ = _tiny_prior_and_hvae()
    cards = {}

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        cards.update({p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("README.md")})
        return "https://huggingface.co/org/prior/commit/1"

    with mock.patch("vqtok.hub.HfApi") as api:
        api.return_value.create_repo.return_value.repo_id = "org/prior"
        api.return_value.upload_folder.side_effect = upload_folder
        prior.push_to_hub("org/prior")
    assert sorted(cards) == ["README.md", "tokenizer/README.md"]
    assert 'prior = vqtok.load("org/prior")' in cards["README.md"]
    assert 'tok = vqtok.load("org/prior", subfolder="tokenizer")' in cards["tokenizer/README.md"]
    assert "/tmp" not in cards["tokenizer/README.md"]  # not the temporary folder it was saved in


@pytest.mark.parametrize("phrase, article", [
    ("autoencoder", "an"), ("VQ image tokenizer", "a"), ("hierarchical VAE", "a"), ("LDM tokenizer", "an"),
    ("image tokenizer", "an"), ("transformer prior", "a"), ("HVAE", "an"), ("Gaussian autoencoder", "a"),
])
def test_the_article_fits_the_phrase(phrase, article):
    from vqtok.hub import indefinite_article

    assert indefinite_article(phrase) == article


def test_a_converted_tokenizer_card_names_the_original_and_its_licence(saved_vq, tmp_path):
    from dataclasses import replace

    from vqtok.config import ConvertedFrom

    model, _ = saved_vq
    origin = ConvertedFrom(format="diffusers", source="org/vq", revision="b" * 40, weights_sha256="c" * 64,
                           class_name="VQModel", license="openrail++")
    converted = Autoencoder(replace(model.config, converted_from=origin))
    card = converted.generate_model_card(repo_id="me/vq")
    text = str(card)
    assert card.data.license == "openrail++" and card.data.to_dict().get("pipeline_tag") is None
    assert text.index("| converted from | diffusers VQModel `org/vq` at " + "b" * 40) < text.index("| model type |")
    assert "| original weights sha256 | " + "c" * 64 in text and "The original's licence applies" in text
    assert converted.generate_model_card(license="other").data.license == "other"  # a licence given wins


# ---- vqtok push: the card names the real repo; a training run's config and picture go with the model -------------


def _mock_hub(repo_id: str):
    """huggingface_hub.HfApi as `vqtok push` uses it; create_commit's operations are kept as {path: bytes}."""
    pushed: dict[str, bytes] = {}

    def create_commit(**kwargs):
        for op in kwargs["operations"]:
            source = op.path_or_fileobj
            pushed[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        return "https://huggingface.co/real/repo/commit/1"

    patch = mock.patch("huggingface_hub.HfApi")
    api = patch.start()
    api.return_value.create_repo.return_value.repo_id = repo_id
    api.return_value.create_commit.side_effect = create_commit
    return patch, api, pushed


def _training_run(model: Autoencoder, root: Path) -> Path:
    """A tokenizer run's folder as vqtok writes it: marker, config.yaml, sample grids, tokenizer/."""
    from vqtok.train.run_folder import RUN_MARKER

    root.mkdir()
    (root / RUN_MARKER).write_text('{"kind": "tokenizer"}\n')
    (root / "config.yaml").write_text("output_dir: run\nmax_steps: 10\neval_images: 64\n"
                                      "data: {source: torchvision, name: MNIST, path: data/mnist}\n")
    (root / "samples").mkdir()
    for step in (2, 10):
        (root / "samples" / f"step_{step:06d}.png").write_bytes(b"png of step %d" % step)
    model.save_pretrained(root / "tokenizer", model_card_kwargs={"metrics": {"psnr": 19.5, "images": 64.0}})
    return root / "tokenizer"


def test_cli_push_of_a_training_run_remakes_the_card_for_the_repo_and_uploads_config_and_picture(saved_vq, tmp_path,
                                                                                                   capsys):
    from vqtok.cli import main

    model, _ = saved_vq
    folder = _training_run(model, tmp_path / "run")
    local_card = (folder / "README.md").read_bytes()
    patch, api, pushed = _mock_hub("real/repo")
    try:
        assert main(["push", str(folder), "repo", "--license", "cc-by-4.0"]) == 0
    finally:
        patch.stop()
    assert sorted(pushed) == ["README.md", "config.json", "model.safetensors", "reconstructions.png",
                              "training_config.yaml"]
    assert pushed["training_config.yaml"] == (tmp_path / "run" / "config.yaml").read_bytes()
    assert pushed["reconstructions.png"] == b"png of step 10"  # the last grid
    assert pushed["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    text = pushed["README.md"].decode()
    card = _card(text)
    assert 'tok = vqtok.load("real/repo")' in text and str(folder) not in text
    assert card.data.license == "cc-by-4.0" and card.data.datasets == ["ylecun/mnist"]
    assert {(r.metric_type, r.metric_value, r.dataset_name) for r in card.data.eval_results} == {
        ("psnr", 19.5, "MNIST (train split), at most 64 images")}
    assert "![Inputs (top row) and their reconstructions" in text and "](reconstructions.png)" in text
    assert "- `training_config.yaml`: the configuration of the training run" in text
    assert "| images | 64.0 |" in text  # the metrics the card was saved with survive the remake
    assert "training_config.yaml" in capsys.readouterr().out
    assert (folder / "README.md").read_bytes() == local_card  # the local card is left as it was


def test_cli_push_keeps_a_card_a_person_edited(saved_vq, tmp_path, capsys):
    from vqtok.cli import main

    model, _ = saved_vq
    folder = tmp_path / "tok"
    model.save_pretrained(folder)
    edited = (folder / "README.md").read_text().replace("## Intended use\n", "## Intended use\n\nMy own words.\n")
    (folder / "README.md").write_text(edited)
    patch, api, pushed = _mock_hub("real/repo")
    try:
        assert main(["push", str(folder), "real/repo", "--license", "mit"]) == 1  # would drop the licence
        assert "cannot be added" in capsys.readouterr().err and not api.return_value.create_repo.called
        assert main(["push", str(folder), "real/repo"]) == 0
    finally:
        patch.stop()
    assert pushed["README.md"].decode() == edited.replace(f'vqtok.load("{folder}")', 'vqtok.load("real/repo")')
    assert "My own words." in pushed["README.md"].decode()
    assert "was edited since vqtok wrote it" in capsys.readouterr().out


# ---- the ecosystem's conventions: torch_dtype and device in load; output objects -----------------------------------


def test_load_with_torch_dtype_casts_the_weights_but_keeps_the_codebook_float32(saved_vq, images):
    model, path = saved_vq
    loaded = vqtok.load(path, torch_dtype=torch.bfloat16, device="cpu")
    assert loaded.encoder.conv_in.weight.dtype == loaded.decoder.conv_out.bias.dtype == torch.bfloat16
    assert loaded.bottleneck.codebook.dtype == torch.float32 and loaded.bottleneck.ema_count.dtype == torch.float32
    assert loaded.bottleneck.last_used.dtype == torch.int64  # integer state stays integer
    # the same weights as casting the float32 model by hand; the codebook is the float32 one, bit for bit
    float32_state = {f"bottleneck.{name}" for name in ("codebook", "ema_count", "ema_sum", "ema_sq_error")}
    for name, tensor in loaded.state_dict().items():
        expected = model.state_dict()[name]
        if expected.is_floating_point() and name not in float32_state:
            expected = expected.to(torch.bfloat16)
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    codes = loaded.encode(images)  # encode and decode work in bfloat16
    assert codes.shape == (4, 8, 8) and codes.dtype == torch.int64
    assert loaded.decode(codes).dtype == torch.bfloat16
    assert vqtok.load(path, torch_dtype="bfloat16").encoder.conv_in.weight.dtype == torch.bfloat16
    assert vqtok.load(path, map_location="cpu").encoder.conv_in.weight.dtype == torch.float32  # the older name
    with pytest.raises(ValueError, match="torch_dtype must be a floating-point dtype.*torch.int8"):
        vqtok.load(path, torch_dtype=torch.int8)
    with pytest.raises(ValueError, match="torch_dtype must be a floating-point dtype.*'bf17'"):
        vqtok.load(path, torch_dtype="bf17")
    with pytest.raises(ValueError, match="device='meta' and map_location='cpu' name different devices"):
        vqtok.load(path, device="meta", map_location="cpu")


def test_encode_return_dict_gives_codes_vectors_and_features_as_the_quantizer_sees_them(saved_vq, images):
    model, _ = saved_vq
    out = model.encode(images, return_dict=True)
    assert isinstance(out, vqtok.EncoderOutput) and out.posterior is None
    features = model.quant_conv(model.encoder(images))  # the pre-quantization features, computed here
    torch.testing.assert_close(out.latents, features, rtol=0, atol=0)
    assert torch.equal(out.codes, model.encode(images))  # what encode gives by default
    # the codes are the nearest codebook rows (float64 brute force) and `quantized` is those rows, as [B, D, h, w]
    codebook = model.bottleneck.codebook.double()
    rows = features.double().permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    assert torch.equal(out.codes.flatten(), torch.cdist(rows, codebook).argmin(dim=1))
    assert out.quantized.dtype == torch.float32 and out.quantized.shape == (4, 4, 8, 8)
    assert torch.equal(out.quantized, model.bottleneck.codebook[out.codes].permute(0, 3, 1, 2))
    decoded = model.decode(out.codes, return_dict=True)
    assert isinstance(decoded, vqtok.DecoderOutput) and torch.equal(decoded.sample, model.decode(out.codes))
    forward = model(images)  # the forward's output holds the codes and the loss terms
    assert torch.equal(forward.bottleneck.codes, out.codes) and set(forward.bottleneck.terms) == {"commitment"}
    torch.testing.assert_close(forward.bottleneck.terms["commitment"], F.mse_loss(features, out.quantized))


def test_encode_return_dict_of_a_gaussian_tokenizer_gives_the_posterior_and_a_sample(gaussian_model, images):
    out = gaussian_model.encode(images, return_dict=True, generator=torch.Generator().manual_seed(3))
    assert out.codes is None and out.quantized is None
    posterior = gaussian_model.encode(images)
    assert torch.equal(out.posterior.mean, posterior.mean) and torch.equal(out.posterior.logvar, posterior.logvar)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.latents, posterior.mean + posterior.std * noise)  # mean + std * eps, by hand
    decoded = gaussian_model.decode(out.latents, return_dict=True).sample
    assert torch.equal(decoded, gaussian_model.decode(out.latents))
