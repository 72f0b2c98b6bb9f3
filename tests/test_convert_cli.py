"""`vqtok convert` and `vqtok info` on other libraries' tokenizers, and the whole pipeline on a diffusers repo:
a token store, a prior trained on its codes, samples decoded through it and an evaluation, with the repo identified
by id and commit throughout (references for the conversion itself are in test_pretrained.py)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vqtok
from tests.test_cli import fails
from vqtok.cli import main
from vqtok.hub import weights_sha256

diffusers = pytest.importorskip("diffusers")

SHA = "c0ffee" + "0" * 34


def tiny_vqmodel(in_channels: int = 1) -> "diffusers.VQModel":
    """A diffusers VQModel with non-trivial random weights: f2, attention at the lower level, 16 codes of dim 4."""
    torch.manual_seed(0)
    model = diffusers.VQModel(in_channels=in_channels, out_channels=in_channels, block_out_channels=(16, 32),
                              down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                              up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                              num_vq_embeddings=16, norm_num_groups=8, layers_per_block=1, sample_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dvq") / "dvq"
    tiny_vqmodel().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a diffusers VQModel\n")
    return folder


@pytest.fixture
def offline_hub(diffusers_folder, tmp_path, monkeypatch) -> str:
    """The folder as the Hub repo org/dvq in an offline cache (huggingface_hub's layout); returns the repo id."""
    import huggingface_hub.constants as constants

    repo = tmp_path / "hub" / "models--org--dvq"
    shutil.copytree(diffusers_folder, repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named org/
    return "org/dvq"


def test_convert_writes_a_vqtok_folder_that_loads_to_the_same_model(capsys, diffusers_folder, tmp_path):
    out = tmp_path / "converted"
    assert main(["convert", str(diffusers_folder), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "diffusers, VQModel" in printed and "16 codes of dim 4" in printed and "vqtok push" in printed
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "autoencoder" and config["converted_from"]["format"] == "diffusers"
    assert config["converted_from"]["license"] == "mit" and config["converted_from"]["class_name"] == "VQModel"
    card = (out / "README.md").read_text()
    assert "license: mit" in card and str(diffusers_folder) in card and config["converted_from"]["weights_sha256"] in card
    direct, saved = vqtok.load(diffusers_folder), vqtok.load(out)
    assert weights_sha256(direct) == weights_sha256(saved)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(direct.encode(x), saved.encode(x))


def test_convert_refuses_an_existing_folder_and_writes_nothing_when_it_fails(capsys, diffusers_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    fails(capsys, ["convert", diffusers_folder, out], "convert", "exists and is not empty")
    assert os.listdir(out) == ["mine.txt"]
    # a checkpoint that fails to convert (a tensor missing) leaves no OUT and no temporary folder
    sd = {k: v for k, v in tiny_vqmodel().state_dict().items() if k != "decoder.conv_out.bias"}
    save_file(sd, tmp_path / "broken.safetensors")
    fails(capsys, ["convert", tmp_path / "broken.safetensors", tmp_path / "new", "--norm-groups", "8"], "convert",
          "missing 1 tensor", "decoder.conv_out.bias")
    assert not (tmp_path / "new").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".new")]


def test_convert_refuses_conflicting_descriptions(capsys, diffusers_folder, tmp_path):
    fails(capsys, ["convert", diffusers_folder, tmp_path / "a", "--config", "x.yaml", "--ch", "64"], "convert",
          "--config and the ddconfig flags")
    fails(capsys, ["convert", diffusers_folder, tmp_path / "a", "--resolution", "64"], "convert",
          "has a config, which sets them")
    fails(capsys, ["convert", diffusers_folder, tmp_path / "a", "--format", "ldm"], "convert",
          "tensor names are diffusers's, not ldm's")
    assert not (tmp_path / "a").exists()


def test_info_describes_a_file_without_building_a_model(capsys, diffusers_folder, tmp_path, monkeypatch):
    save_file(tiny_vqmodel().state_dict(), tmp_path / "vq.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("info built a model")

    monkeypatch.setattr(vqtok.Autoencoder, "__init__", refuse)
    assert main(["info", str(tmp_path / "vq.safetensors"), "--resolution", "8", "--norm-groups", "8"]) == 0
    text = capsys.readouterr().out
    assert "a diffusers checkpoint" in text and "16 codes of dim 4" in text and "8x8 -> 4x4 codes" in text
    assert "attention at [4] (resolution 8), mid" in text and "norm_groups 8" in text
    assert main(["info", str(diffusers_folder)]) == 0
    text = capsys.readouterr().out
    assert "a diffusers VQModel" in text and "license: mit" in text
    n = sum(p.numel() for p in tiny_vqmodel().parameters())
    assert f"parameters: {n:,}" in text


def test_a_diffusers_repo_goes_through_the_whole_pipeline(capsys, offline_hub, tmp_path):
    """encode -> token store -> prior -> samples -> eval, the tokenizer named by repo id and pinned by commit."""
    repo = offline_hub
    for split in ("train", "test"):
        assert main(["encode", "--tokenizer", repo, "--data", "digits", "--split", split, "--limit", "64",
                     "--out", f"store-{split}", "--num-workers", "0", "--batch-size", "32"]) == 0
    manifest = json.loads(Path("store-train/manifest.json").read_text())
    tokenizer = manifest["tokenizer"]
    assert (tokenizer["source"], tokenizer["revision"]) == (repo, SHA)
    assert tokenizer["config"]["converted_from"]["format"] == "diffusers"
    assert tokenizer["weights_sha256"] == weights_sha256(vqtok.load(repo))
    Path("prior.yaml").write_text(
        "prior: {n_layer: 2, n_head: 2, n_embd: 32}\ntokens: store-train\neval_tokens: store-test\n"
        "output_dir: prior\nmax_steps: 4\nbatch_size: 16\nwarmup_steps: 1\neval_every: 4\ncheckpoint_every: 4\n"
        "log_every: 2\nnum_samples: 4\n")
    assert main(["train-prior", "prior.yaml"]) == 0
    prior = vqtok.load("prior/prior")
    assert (prior.config.tokenizer.repo_id, prior.config.tokenizer.revision) == (repo, SHA)
    assert not Path("prior/prior/tokenizer").exists()  # on the Hub: recorded, not copied
    assert prior.tokenizer.config.converted_from.format == "diffusers"  # loaded back through the converter
    assert main(["sample", "--prior", "prior/prior", "--n", "4", "--out", "samples.png", "--seed", "0"]) == 0
    assert Path("samples.png").is_file()
    capsys.readouterr()
    assert main(["eval", repo, "--data", "digits", "--split", "test", "--limit", "32", "--batch-size", "16",
                 "--out", "eval.json"]) == 0
    metrics = json.loads(Path("eval.json").read_text())
    assert metrics["images"] == 32 and 0 < metrics["psnr"] < 100 and 0 < metrics["code_usage"] <= 1
