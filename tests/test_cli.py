"""The command line on bad input: every failure ends in one line `vqtok COMMAND: error: ...` naming the problem
(exit status 1), bad numbers are refused while parsing (argparse's usage line and status 2), nothing large is
allocated for an absurd request, and a sample of any size is written batch by batch."""

import errno
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import vqtok
import vqtok.cli
from tests.conftest import png_header, tiny_config
from vqtok.cli import main
from vqtok.config import DataConfig, GaussianConfig, PreprocessConfig, PriorConfig, VQConfig
from vqtok.models import TransformerPrior
from vqtok.models.prior import tokenizer_ref
from vqtok.seeds import keyed_seed
from vqtok.train.evaluate import save_image_grid

TINY_PRIOR = dict(n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny VQ tokenizer (16 codes, 8x8 grid, grey 16x16 images), a prior paired with it, a Gaussian tokenizer."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    tok = vqtok.Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4, kmeans_init=False), in_channels=1,
                                        preprocess=PreprocessConfig(resize=16))).eval()
    tok.save_pretrained(root / "tok")
    prior = TransformerPrior(PriorConfig(vocab_size=16, grid=(8, 8), num_classes=10, tokenizer=tokenizer_ref(tok),
                                         **TINY_PRIOR)).eval()
    prior.attach_tokenizer(tok)
    prior.save_pretrained(root / "prior")
    vqtok.Autoencoder(tiny_config(GaussianConfig(dim=3), in_channels=1)).save_pretrained(root / "vae")
    vqtok.HierarchicalVAE(vqtok.HierarchicalVAEConfig(
        in_channels=1, resolution=8, scales=(4, 2), groups_per_scale=(1, 1), latent_channels=2, width=8,
        encoder_cells=1, cells_per_group=1)).save_pretrained(root / "hvae")
    return {"root": root, "tok": root / "tok", "prior": root / "prior", "vae": root / "vae", "hvae": root / "hvae"}


def fails(capsys, argv: list[str], verb: str, *fragments: str, only_line: bool = True) -> str:
    """Run the CLI, expect exit status 1 and a stderr that is exactly one line `vqtok VERB: error: ...` holding
    every fragment (`only_line=False`: that line last, after progress bars); returns that line."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.split("\n")
    assert status == 1 and lines[-1] == "" and "Traceback" not in err, err
    assert len(lines) == 2 or not only_line, err
    assert lines[-2].startswith(f"vqtok {verb}: error: "), err
    for fragment in fragments:
        assert fragment in lines[-2], (fragment, lines[-2])
    return lines[-2]


def refused_while_parsing(capsys, argv: list[str], verb: str, *fragments: str) -> None:
    """argparse's way: usage, then one last line `vqtok VERB: error: argument ...`, exit status 2, no traceback."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert status == 2 and "Traceback" not in err, err
    assert last.startswith(f"vqtok {verb}: error: argument "), err
    for fragment in fragments:
        assert fragment in last, (fragment, last)


# ---- numbers are checked while parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragments", [
    (["sample", "--prior", "p", "--out", "g.png", "--batch-size", "-2"], ("--batch-size", "positive integer", "-2")),
    (["sample", "--prior", "p", "--out", "g.png", "--cfg-scale", "nan"], ("--cfg-scale", "finite", "nan")),
    (["sample", "--prior", "p", "--out", "g.png", "--temperature", "inf"], ("--temperature", "finite")),
    (["sample", "--prior", "p", "--out", "g.png", "--temperature", "-1"], ("--temperature", ">= 0")),
    (["sample", "--prior", "p", "--out", "g.png", "--top-p", "1.5"], ("--top-p", "(0, 1]")),
    (["sample", "--prior", "p", "--out", "g.png", "--top-k", "0"], ("--top-k", "positive")),
    (["sample", "--prior", "p", "--out", "g.png", "--n", "0"], ("--n", "positive")),
    (["sample", "--prior", "p", "--out", "g.png", "--class", "-1"], ("--class", ">= 0")),
    (["sample", "--prior", "p", "--out", "g.png", "--seed", "x"], ("--seed", "must be an integer")),
    (["decode", "codes.npy", "--out", "g.png", "--n", "0"], ("--n", "positive integer, got 0")),
    (["decode", "codes.npy", "--out", "g.png", "--n", "5000"], ("--n", "at most 1024")),
    (["eval", "tok", "--data", "digits", "--batch-size", "-2"], ("--batch-size", "positive")),
    (["eval", "tok", "--data", "digits", "--limit", "0"], ("--limit", "positive")),
    (["encode", "--tokenizer", "t", "--data", "digits", "--out", "s", "--shard-size", "0"], ("--shard-size",)),
    (["encode", "--tokenizer", "t", "--data", "digits", "--out", "s", "--num-workers", "-1"], ("--num-workers",)),
    (["eval", "tok", "--data", "digits", "--iwae", "0"], ("--iwae", "positive integer, got 0")),
    (["eval", "tok", "--data", "digits", "--iwae", "5", "--iwae-batch", "0"], ("--iwae-batch", "positive")),
    (["eval", "tok", "--data", "digits", "--offset", "-1"], ("--offset", ">= 0, got -1")),
    (["encode", "--tokenizer", "t", "--data", "digits", "--out", "s", "--binarize", "x"], ("--binarize", "integer")),
    (["sample", "--model", "m", "--out", "g.png", "--n", "0"], ("--n", "positive")),
])
def test_bad_numbers_are_refused_while_parsing(capsys, argv, fragments):
    refused_while_parsing(capsys, argv, argv[0], *fragments)


# ---- every error is one line ----------------------------------------------------------------------------------------


def test_a_prior_given_as_a_tokenizer(capsys, folders, tmp_path):
    prior, codes = folders["prior"], tmp_path / "codes.npy"
    np.save(codes, np.zeros((2, 8, 8), dtype=np.int64))
    not_a_tokenizer = "holds a transformer_prior, not a tokenizer"
    fails(capsys, ["eval", prior, "--data", "digits"], "eval", not_a_tokenizer)
    fails(capsys, ["decode", codes, "--tokenizer", prior, "--out", tmp_path / "g.png"], "decode", not_a_tokenizer)
    fails(capsys, ["sample", "--prior", prior, "--tokenizer", prior, "--out", tmp_path / "g.png"], "sample",
          not_a_tokenizer)
    fails(capsys, ["encode", "--tokenizer", prior, "--data", "digits", "--out", tmp_path / "store"], "encode",
          "TypeError", "needs an image tokenizer", "--debug")
    fails(capsys, ["sample", "--prior", folders["tok"], "--out", tmp_path / "g.png"], "sample",
          "not a transformer prior")
    assert not (tmp_path / "g.png").exists()


def test_an_output_path_under_a_file_is_refused_before_any_work(capsys, folders, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    sample = ["sample", "--prior", folders["prior"], "--n", "2"]
    with mock.patch.object(TransformerPrior, "generate_batches", side_effect=AssertionError("sampled")):
        fails(capsys, [*sample, "--out", a_file / "grid.png"], "sample", f"{a_file} is a file, not a folder")
        fails(capsys, [*sample, "--out", tmp_path], "sample", "is a folder")
        fails(capsys, [*sample, "--out", tmp_path / "grid.txt"], "sample", "not an image file name")
        fails(capsys, [*sample, "--out", tmp_path / "g.png", "--images-dir", a_file], "sample",
              f"--images-dir {a_file}: is a file")
        fails(capsys, [*sample, "--out", tmp_path / "g.png", "--codes", a_file / "c.npy"], "sample", "is a file")
    fails(capsys, ["encode", "--tokenizer", folders["tok"], "--data", "digits", "--limit", "4", "--num-workers", "0",
                   "--out", a_file], "encode", "Not a directory", str(a_file))
    fails(capsys, ["eval", folders["tok"], "--data", "digits", "--out", a_file / "m.json"], "eval", "is a file")
    assert a_file.read_text() == "mine"


def test_a_full_disk_is_one_line(capsys, folders, tmp_path):
    out = tmp_path / "grid.png"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))
    with mock.patch("vqtok.cli._save_grid", side_effect=full):
        fails(capsys, ["sample", "--prior", folders["prior"], "--n", "2", "--out", out, "--codes", tmp_path / "c.npy"],
              "sample", f"No space left on device: {out}", only_line=False)  # after the progress bar
    assert sorted(os.listdir(tmp_path)) == []  # the codes file was staged, and removed with the failure


def test_an_unexpected_error_names_its_type_and_debug_shows_the_traceback(capsys, folders, tmp_path):
    argv = ["sample", "--prior", folders["prior"], "--n", "2", "--out", tmp_path / "g.png"]
    boom = RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")
    with mock.patch.object(TransformerPrior, "generate_batches", side_effect=boom):
        fails(capsys, argv, "sample", "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", "--debug")
        for debug in (["--debug", *argv], [*argv, "--debug"]):
            assert main([str(a) for a in debug]) == 1
            err = capsys.readouterr().err
            assert "Traceback (most recent call last)" in err and "generate_batches" not in err.splitlines()[-1]
            assert err.splitlines()[-1].startswith("vqtok sample: error: RuntimeError: CUDA out of memory.")


def test_ctrl_c_is_one_line_and_status_130(capsys, folders):
    with mock.patch("vqtok.load", side_effect=KeyboardInterrupt):
        assert main(["info", str(folders["tok"])]) == 130
    assert capsys.readouterr().err == "vqtok info: interrupted\n"


def test_devices_that_are_not_here(capsys, folders, tmp_path):
    argv = ["sample", "--prior", folders["prior"], "--n", "2", "--out", tmp_path / "g.png", "--device"]
    fails(capsys, [*argv, "banana"], "sample", "--device 'banana': not a device")
    if not torch.cuda.is_available():
        fails(capsys, [*argv, "cuda"], "sample", "--device cuda: CUDA is not available")
    else:
        fails(capsys, [*argv, f"cuda:{torch.cuda.device_count()}"], "sample", "CUDA device(s)")


def test_an_error_in_a_data_loader_worker_is_its_own_line(capsys, folders, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(images / "a.png")
    (images / "b.png").write_bytes(b"not a png")
    line = fails(capsys, ["encode", "--tokenizer", folders["tok"], "--data", f"folder:{images}", "--num-workers", "1",
                          "--out", tmp_path / "store"], "encode", f"cannot read image {images / 'b.png'}",
                 "(in a data loader worker)", only_line=False)
    assert line.count("cannot read image") == 1


# ---- decode refuses what is not codes -------------------------------------------------------------------------------


@pytest.mark.parametrize("array, fragments", [
    (np.full((3, 8, 8), 2.7), ("must be integers [n, h, w]", "float values", "truncated")),
    (np.zeros((3, 8, 8), dtype=bool), ("must be integers", "bool")),
    (np.zeros((8, 8), dtype=np.int64), ("must be integers [n, h, w]", "shape [8, 8]")),
    (np.zeros((0, 8, 8), dtype=np.int64), ("holds no codes",)),
    (np.full((3, 8, 8), 16, dtype=np.int64), ("must lie in [0, 16)", "[16, 16]")),
    (np.full((3, 8, 8), -1, dtype=np.int32), ("must lie in [0, 16)", "[-1, -1]")),
])
def test_decode_refuses_what_is_not_codes(capsys, folders, tmp_path, array, fragments):
    np.save(tmp_path / "codes.npy", array)
    fails(capsys, ["decode", tmp_path / "codes.npy", "--tokenizer", folders["tok"], "--out", tmp_path / "g.png"],
          "decode", str(tmp_path / "codes.npy"), *fragments)
    assert not (tmp_path / "g.png").exists()


def test_decode_refuses_unreadable_files(capsys, folders, tmp_path):
    argv = ["--tokenizer", folders["tok"], "--out", tmp_path / "g.png"]
    (tmp_path / "empty.npy").write_bytes(b"")
    fails(capsys, ["decode", tmp_path / "empty.npy", *argv], "decode", "empty.npy: not a readable .npy array")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    fails(capsys, ["decode", tmp_path / "objects.npy", *argv], "decode", "objects.npy: not a readable .npy array")
    fails(capsys, ["decode", tmp_path / "absent.npy", *argv], "decode", "no token store folder or .npy file")


def test_decode_reads_codes_and_gaussian_latents(capsys, folders, tmp_path):
    codes = np.random.default_rng(0).integers(0, 16, (5, 8, 8)).astype(np.uint16)
    np.save(tmp_path / "codes.npy", codes)
    assert main(["decode", str(tmp_path / "codes.npy"), "--tokenizer", str(folders["tok"]), "--n", "3",
                 "--out", str(tmp_path / "g.png")]) == 0
    tok = vqtok.load(folders["tok"])
    expected = tok.postprocess(tok.decode(torch.from_numpy(codes[:3].astype(np.int64))))
    save_image_grid(expected, tmp_path / "expected.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(Image.open(tmp_path / "expected.png")))
    latents = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    assert main(["decode", str(tmp_path / "latents.npy"), "--tokenizer", str(folders["vae"]),
                 "--out", str(tmp_path / "v.png")]) == 0
    capsys.readouterr()
    fails(capsys, ["decode", tmp_path / "codes.npy", "--tokenizer", folders["vae"], "--out", tmp_path / "v.png"],
          "decode", "a Gaussian tokenizer decodes float latents [n, 3, h, w], got uint16")
    latents[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "latents.npy", latents)
    fails(capsys, ["decode", tmp_path / "latents.npy", "--tokenizer", folders["vae"], "--out", tmp_path / "v.png"],
          "decode", "NaN or infinite")


# ---- size guards ----------------------------------------------------------------------------------------------------


def _edit_config(folder: Path, tmp_path: Path, edit) -> Path:
    import shutil

    copy = Path(shutil.copytree(folder, tmp_path / folder.name))
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("folder, edit, fragments", [
    ("tok", lambda c: c.update(base_channels=100_000),
     ("config.json: base_channels 100000", "more than vqtok's limit")),
    ("tok", lambda c: c["bottleneck"].update(codebook_size=10**9, kmeans_samples=None),
     ("bottleneck.codebook_size 1000000000 with dim 4", "limit")),
    ("prior", lambda c: c.update(vocab_size=10**9), ("vocab_size 1000000000", "limit")),
    ("prior", lambda c: c.update(n_layer=10**6), ("n_layer 1000000", "limit")),
])
def test_a_config_json_of_an_absurd_size_is_refused_before_allocation(capsys, folders, tmp_path, folder, edit,
                                                                      fragments):
    path = _edit_config(folders[folder], tmp_path, edit)
    with mock.patch("torch.nn.Module.__init__", side_effect=AssertionError("a model was built")):
        fails(capsys, ["info", path], "info", str(path / "config.json"), *fragments)


def test_a_set_of_an_absurd_size_is_refused(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmodel:\n  base_channels: 16\n  norm_groups: 8\n")
    with mock.patch("torch.nn.Module.__init__", side_effect=AssertionError("a model was built")):
        fails(capsys, ["train", config, "--set", "model.base_channels=100000"], "train", "c.yaml",
              "model.base_channels 100000", "limit")
        fails(capsys, ["train", config, "--set", "model.bottleneck={kind: vq, codebook_size: 1000000000}"], "train",
              "model.bottleneck.codebook_size 1000000000 with dim 64")
    assert not (tmp_path / "run").exists()


def test_a_deeply_nested_config_is_a_clear_error(capsys, folders, tmp_path):
    path = _edit_config(folders["tok"], tmp_path, lambda c: None)
    (path / "config.json").write_text('{"model_type": ' + "[" * 100_000 + "]" * 100_000 + "}")
    fails(capsys, ["info", path], "info", "config.json: nested too deeply")
    config = tmp_path / "deep.yaml"
    config.write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    fails(capsys, ["train", config], "train", "deep.yaml: nested too deeply")


def test_a_decompression_bomb_is_an_unreadable_image(capsys, folders, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(images / "a.png")
    png_header(images / "b.png", 20_000, 20_000)
    fails(capsys, ["eval", folders["tok"], "--data", f"folder:{images}"], "eval",
          f"cannot read image {images / 'b.png'}", "decompression bomb", "rerun with --skip-unreadable",
          only_line=False)  # after the progress bar


def test_a_broken_link_is_an_unreadable_image(capsys, folders, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(images / "a.png")
    (images / "b.png").symlink_to(tmp_path / "gone.png")
    fails(capsys, ["eval", folders["tok"], "--data", f"folder:{images}"], "eval",
          f"cannot read image {images / 'b.png'}: a broken symbolic link (to {tmp_path / 'gone.png'})",
          only_line=False)


# ---- sampling many images -------------------------------------------------------------------------------------------


def test_sampling_more_than_the_grid_shows_needs_somewhere_to_write_them(capsys, folders, tmp_path):
    with mock.patch.object(TransformerPrior, "generate_batches", side_effect=AssertionError("sampled")):
        fails(capsys, ["sample", "--prior", folders["prior"], "--n", "100000000", "--out", tmp_path / "g.png"],
              "sample", "--n 100000000", "at most 1024", "--images-dir or --codes")
        fails(capsys, ["sample", "--prior", folders["prior"], "--n", "10000000000000", "--out", tmp_path / "g.png",
                       "--codes", tmp_path / "c.npy"], "sample", "--codes", "needs 4,768,371.58 GiB", "GiB are free")
    assert os.listdir(tmp_path) == []


def test_many_samples_are_written_batch_by_batch(capsys, folders, tmp_path, monkeypatch):
    """More samples than the grid shows: generated, decoded and written 4 at a time; the codes are those of
    generate() with the same batch size, the PNGs their decoded images, and the grid the first MAX_GRID_IMAGES."""
    monkeypatch.setattr(vqtok.cli, "MAX_GRID_IMAGES", 6)
    calls = []
    real_decode = vqtok.cli._decode_images

    def counted_decode(tokenizer, codes):
        calls.append(len(codes))
        return real_decode(tokenizer, codes)

    monkeypatch.setattr(vqtok.cli, "_decode_images", counted_decode)
    out, codes_path, images = tmp_path / "grid.png", tmp_path / "codes.npy", tmp_path / "imgs"
    assert main(["sample", "--prior", str(folders["prior"]), "--n", "10", "--class", "3", "--batch-size", "4",
                 "--seed", "7", "--device", "cpu", "--out", str(out), "--codes", str(codes_path),
                 "--images-dir", str(images)]) == 0
    assert "wrote " + str(out) + " (the first 6)" in capsys.readouterr().out
    assert calls == [4, 4, 2]
    prior = vqtok.load(folders["prior"])
    expected = prior.generate(10, labels=3, seed=7, batch_size=4)
    codes = np.load(codes_path)
    assert codes.dtype == np.int64 and np.array_equal(codes, expected.numpy())
    decoded = prior.tokenizer.postprocess(prior.tokenizer.decode(expected))
    assert sorted(os.listdir(images)) == [f"{i:05d}.png" for i in range(10)]
    for i in (0, 5, 9):
        assert np.array_equal(np.asarray(Image.open(images / f"{i:05d}.png")), decoded[i, 0].numpy())
    save_image_grid(decoded[:6], tmp_path / "expected.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "expected.png")))


def test_generate_batches_gives_the_codes_of_generate_chunk_by_chunk():
    """Chunks of batch_size, drawn in turn from one seeded generator, each with its own samples' labels: checked
    against the chunks sampled one by one with a shared generator, and against greedy decoding of each sample alone
    (which depends on its label only)."""
    torch.manual_seed(0)
    prior = TransformerPrior(PriorConfig(vocab_size=16, grid=(2, 3), num_classes=4, **TINY_PRIOR)).eval()
    for labels in (None, 2, [0, 1, 2, 3, 0, 1, 2]):
        chunks = list(prior.generate_batches(7, labels=labels, seed=3, batch_size=3, top_k=5))
        assert [len(c) for c in chunks] == [3, 3, 1] and all(c.shape[1:] == (2, 3) for c in chunks)
        assert torch.equal(torch.cat(chunks), prior.generate(7, labels=labels, seed=3, batch_size=3, top_k=5))
        per_sample = torch.tensor(labels if isinstance(labels, list) else [4 if labels is None else labels] * 7)
        generator = torch.Generator().manual_seed(3)
        expected = [prior._sample(part, torch.empty(len(part), 0, dtype=torch.long), 1.0, 5, None, 1.0, generator, True)
                    for part in per_sample.split(3)]
        assert torch.equal(torch.cat(chunks), torch.cat(expected).view(7, 2, 3))
        greedy = torch.cat(list(prior.generate_batches(7, labels=labels, temperature=0, batch_size=3)))
        for i, label in enumerate(per_sample.tolist()):
            alone = prior.generate(1, labels=None if labels is None else label, temperature=0)
            assert torch.equal(greedy[i : i + 1], alone), i
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        prior.generate_batches(7, batch_size=-2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        prior.generate_batches(0)


# ---- Hub names ------------------------------------------------------------------------------------------------------


def test_a_mistyped_local_path_is_reported_at_once(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with mock.patch("vqtok.hub.hf_hub_download", side_effect=AssertionError("asked the Hub")):
        fails(capsys, ["info", "runs/mytokenizer"], "info", "no local folder runs/mytokenizer",
              "runs/ is a local folder", "runs/mytokenizer@main")
        fails(capsys, ["info", "./mytokenizer"], "info", "no local folder ./mytokenizer")
        fails(capsys, ["eval", "mytokenizer", "--data", "digits"], "eval", "no local folder mytokenizer")


# ---- sampling a VAE's own prior -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hvae", "vae"])
def test_sample_model_draws_from_a_vaes_own_prior_batch_by_batch(capsys, folders, tmp_path, monkeypatch, name):
    """5 images 2 at a time: batch j drawn by model.sample with the seed keyed by (--seed, j); the PNGs are those
    images, the grid (at most MAX_GRID_IMAGES, here 3: within the second batch) their first ones; the same seed gives
    the same images."""
    monkeypatch.setattr(vqtok.cli, "MAX_GRID_IMAGES", 3)
    model = vqtok.load(folders[name]).eval()

    def run(seed: int, out: Path, images: Path) -> None:
        assert main(["sample", "--model", str(folders[name]), "--n", "5", "--batch-size", "2", "--seed", str(seed),
                     "--temperature", "0.7", "--device", "cpu", "--out", str(out), "--images-dir", str(images)]) == 0
        assert f"sampled 5 images; wrote {out} (the first 3), {images}/ (5 PNG files)" in capsys.readouterr().out

    run(3, tmp_path / "a.png", tmp_path / "a")
    with torch.inference_mode():
        expected = torch.cat([model.postprocess(model.sample(count, temperature=0.7, seed=keyed_seed(3, j)))
                              for j, count in enumerate([2, 2, 1])])
    assert sorted(os.listdir(tmp_path / "a")) == [f"{i:05d}.png" for i in range(5)]
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / f"{i:05d}.png")), expected[i, 0].numpy())
    save_image_grid(expected[:3], tmp_path / "expected.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "expected.png")))
    run(3, tmp_path / "b.png", tmp_path / "b")
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    run(4, tmp_path / "c.png", tmp_path / "c")
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(Image.open(tmp_path / "a.png")))


@pytest.mark.parametrize("flags, named", [
    (["--top-k", "5", "--top-p", "0.9"], "--top-k, --top-p"),
    (["--cfg-scale", "1"], "--cfg-scale"),
    (["--tokenizer", "t"], "--tokenizer"),
    (["--codes", "c.npy"], "--codes"),
])
def test_sample_model_refuses_the_options_of_a_transformer_prior(capsys, folders, tmp_path, flags, named):
    with mock.patch.object(vqtok.HierarchicalVAE, "sample", side_effect=AssertionError("sampled")):
        fails(capsys, ["sample", "--model", folders["hvae"], "--out", tmp_path / "g.png", *flags], "sample",
              f"{named}: for sampling codes from a transformer prior (--prior), not a VAE's own prior (--model)")
    assert os.listdir(tmp_path) == []


def test_sample_needs_one_model_with_a_prior_of_its_own(capsys, folders, tmp_path):
    out = tmp_path / "g.png"
    assert main(["sample", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("vqtok sample: error: one of the arguments --prior --model is "
                                                        "required")
    refused_while_parsing(capsys, ["sample", "--prior", folders["prior"], "--model", folders["hvae"], "--out", out],
                          "sample", "argument --model: not allowed with argument --prior")
    fails(capsys, ["sample", "--model", folders["tok"], "--out", out], "sample",
          "is a VQ tokenizer, which has no prior of its own: sample codes with a transformer prior (--prior)")
    fails(capsys, ["sample", "--model", folders["prior"], "--out", out], "sample",
          "holds a transformer_prior, not a tokenizer")
    line = fails(capsys, ["sample", "--model", folders["hvae"], "--n", "2000", "--out", out], "sample",
                 "--n 2000: the grid (--out) shows at most 1024 images; to sample more, write them with --images-dir")
    assert "--codes" not in line
    assert os.listdir(tmp_path) == []


# ---- eval and encode: which images, binarized how; the importance-weighted bound ------------------------------------


def test_eval_passes_the_window_the_binarization_and_the_bound_on(capsys, folders, monkeypatch):
    import importlib

    calls = []

    def fake_evaluate(model, dataset, **kwargs):
        calls.append((model, dataset, kwargs))
        return {"images": float(len(dataset))}

    monkeypatch.setattr(importlib.import_module("vqtok.train.evaluate"), "evaluate", fake_evaluate)
    base = ["eval", str(folders["hvae"]), "--data", "digits", "--batch-size", "8"]
    assert main([*base, "--offset", "290", "--binarize", "5", "--iwae", "50"]) == 0
    model, dataset, kwargs = calls.pop()
    assert isinstance(model, vqtok.HierarchicalVAE)
    assert kwargs == {"batch_size": 8, "perceptual": None, "iwae": 50, "progress": True}  # evaluate's iwae_batch
    assert len(dataset) == 7 and dataset.source.first == 290 and dataset.binarize_seed == 5  # 297 test digits
    assert main([*base, "--split", "train", "--limit", "3", "--iwae", "2", "--iwae-batch", "64"]) == 0
    model, dataset, kwargs = calls.pop()
    assert (kwargs["iwae"], kwargs["iwae_batch"]) == (2, 64) and len(dataset) == 3 and dataset.binarize_seed is None
    assert main(base) == 0
    assert "iwae" not in calls.pop()[2]  # no bound asked for: evaluate's own default
    capsys.readouterr()
    fails(capsys, [*base, "--iwae-batch", "64"], "eval", "--iwae-batch", "needs --iwae K")
    fails(capsys, [*base, "--offset", "297"], "eval", "data.offset 297 is beyond the end", "holds 297 images")
    assert calls == []


def test_eval_reports_a_hierarchical_vae_on_binarized_images(capsys, folders, tmp_path):
    out = tmp_path / "m.json"
    assert main(["eval", str(folders["hvae"]), "--data", "digits", "--limit", "8", "--binarize", "1",
                 "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 8 and 0 < metrics["neg_elbo_bits_per_dim"]  # binary images: a code length


def test_encode_records_the_window_and_the_binarization(folders, tmp_path):
    out = tmp_path / "store"
    assert main(["encode", "--tokenizer", str(folders["tok"]), "--data", "digits", "--offset", "10", "--limit", "3",
                 "--binarize", "9", "--num-workers", "0", "--out", str(out)]) == 0
    data = json.loads((out / "manifest.json").read_text())["args"]["data"]
    assert data == {**data, "offset": 10, "limit": 3, "binarize": "once", "binarize_seed": 9}
    assert vqtok.cli.parse_data_spec("digits", "test", 3, offset=10, binarize_seed=9) == DataConfig(
        source="digits", split="test", limit=3, offset=10, binarize="once", binarize_seed=9)


# ---- folders of real images: a bare directory, unreadable files skipped by a flag; progress of eval and sample ------


def test_a_directory_given_as_data_is_an_image_folder(tmp_path, monkeypatch):
    from vqtok.cli import parse_data_spec
    from vqtok.config import ConfigError

    (tmp_path / "photos").mkdir()
    assert parse_data_spec(str(tmp_path / "photos")) == DataConfig(source="folder", path=str(tmp_path / "photos"))
    assert parse_data_spec(f"folder:{tmp_path}") == DataConfig(source="folder", path=str(tmp_path))  # still
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    assert parse_data_spec("digits") == DataConfig(source="digits")  # the explicit forms first: ./digits for the folder
    assert parse_data_spec("./digits", skip_unreadable=True) == DataConfig(source="folder", path="./digits",
                                                                           skip_unreadable=True)
    with pytest.raises(ConfigError, match="--data 'photo': not a directory, nor one of digits, folder:PATH"):
        parse_data_spec("photo")


def test_a_folder_of_photos_with_an_unreadable_file_is_evaluated_and_encoded_with_skip_unreadable(capsys, folders,
                                                                                                  tmp_path):
    """The issue's folder: a 65x74 JPEG, a 64x48 PNG and a file that is no image, given as a bare directory. Without
    --skip-unreadable, eval and encode (in a data loader worker too) name the file and the flag; with it, both
    count the two photos, resized and cropped to the tokenizer's 16x16."""
    from tests.test_data import write_photos
    from tests.test_token_store import make_tokenizer

    photos = tmp_path / "photos"
    write_photos(photos)
    (photos / "notes.png").write_text("not an image")
    tok = str(folders["tok"])
    fails(capsys, ["eval", tok, "--data", photos], "eval", f"cannot read image {photos / 'notes.png'}",
          "rerun with --skip-unreadable to skip and count such files", only_line=False)
    line = fails(capsys, ["encode", "--tokenizer", tok, "--data", photos, "--out", tmp_path / "s", "--num-workers",
                          "1"], "encode", "notes.png", "rerun with --skip-unreadable", only_line=False)
    assert "data.skip_unreadable" not in line
    assert main(["eval", tok, "--data", str(photos), "--skip-unreadable", "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["images"] == 2
    old = make_tokenizer(tmp_path / "old", VQConfig(codebook_size=16, dim=4, kmeans_init=False))  # resize, no crop
    assert main(["eval", str(old), "--data", str(photos), "--skip-unreadable", "--batch-size", "1"]) == 0  # 16x20
    capsys.readouterr()
    assert main(["encode", "--tokenizer", tok, "--data", str(photos), "--skip-unreadable", "--out",
                 str(tmp_path / "store"), "--num-workers", "0"]) == 0
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["num_items"] == 2 and manifest["image_shape"] == [1, 16, 16] and manifest["grid"] == [8, 8]
    assert manifest["args"]["data"]["skip_unreadable"] is True and manifest["args"]["data"]["source"] == "folder"
    capsys.readouterr()
    fails(capsys, ["eval", tok, "--data", "digits", "--skip-unreadable"], "eval",
          "skip_unreadable skips image files that cannot be decoded: it applies to source 'folder' only")


def test_eval_and_sample_show_progress_on_stderr_and_keep_their_output(capsys, folders, tmp_path):
    from vqtok.train.evaluate import format_table

    assert main(["eval", str(folders["tok"]), "--data", "digits", "--limit", "12", "--batch-size", "5",
                 "--out", str(tmp_path / "m.json")]) == 0
    captured = capsys.readouterr()
    assert "eval: 100%" in captured.err and "12/12" in captured.err
    assert captured.out == format_table(json.loads((tmp_path / "m.json").read_text())) + "\n"  # the table alone
    assert main(["sample", "--prior", str(folders["prior"]), "--n", "3", "--batch-size", "2", "--device", "cpu",
                 "--out", str(tmp_path / "g.png")]) == 0
    captured = capsys.readouterr()
    assert "sample: 100%" in captured.err and "3/3" in captured.err
    assert captured.out == f"sampled 3 images; wrote {tmp_path / 'g.png'}\n"


# ---- --help: every option says what it does and its default ------------------------------------------------------


def test_every_option_has_help_and_help_shows_defaults(capsys):
    import argparse

    parser = vqtok.cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, command in [("vqtok", parser), *commands.items()]
        for action in command._actions
        if action.option_strings and not {"-h", "--debug", "--version"} & set(action.option_strings)
        and not (action.help or "").strip()
    ]
    assert missing == []
    assert len(commands) >= 10  # (the walk saw the subcommands)
    assert main(["encode", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 256)" in text and "(default: 10000)" in text and "(default: train)" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # an option off by default says nothing
    assert main(["sample", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED random seed: the same seed, --n and --batch-size give the same images (default: 0)" in text
    assert "(default 64)" in text and "(default: 64)" not in text  # a help that names its default is left alone


def test_push_of_a_prior_remakes_both_cards_for_the_repo(folders, tmp_path, capsys):
    import shutil

    prior = Path(shutil.copytree(folders["prior"], tmp_path / "prior"))
    pushed = {}

    def create_commit(**kwargs):
        pushed.update({op.path_in_repo: op.path_or_fileobj for op in kwargs["operations"]})
        return "https://huggingface.co/org/prior/commit/1"

    with mock.patch("huggingface_hub.HfApi") as api:
        api.return_value.create_repo.return_value.repo_id = "org/prior"
        api.return_value.create_commit.side_effect = create_commit
        assert main(["push", str(prior), "org/prior"]) == 0
    assert sorted(pushed) == ["README.md", "config.json", "model.safetensors", "tokenizer/README.md",
                              "tokenizer/config.json", "tokenizer/model.safetensors"]
    card, tokenizer_card = pushed["README.md"].decode(), pushed["tokenizer/README.md"].decode()
    assert 'prior = vqtok.load("org/prior")' in card and "autoregressive-prior" in card
    assert 'tok = vqtok.load("org/prior", subfolder="tokenizer")' in tokenizer_card and str(prior) not in tokenizer_card
    assert "pushed" in capsys.readouterr().out
