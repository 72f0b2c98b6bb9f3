"""The token store: layout, resume after SIGKILL byte for byte, two processes = one, tamper and mismatch errors,
and decoding stored codes = the tokenizer's own reconstruction."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqtok
import vqtok.cli
from tests.conftest import tiny_config
from vqtok.config import DataConfig, GaussianConfig, PreprocessConfig, VQConfig
from vqtok.data import TokenDataset, TokenStoreError, build_dataset, encode_dataset

ROOT = Path(__file__).resolve().parents[1]
ENCODE_FLAGS = ["--data", "digits", "--limit", "1200", "--shard-size", "100", "--batch-size", "24", "--num-workers", "0"]


def make_tokenizer(path: Path, bottleneck, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = tiny_config(bottleneck, in_channels=1, base_channels=16, preprocess=PreprocessConfig(resize=16))
    vqtok.Autoencoder(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "vq", VQConfig(codebook_size=16, dim=4, kmeans_init=False))


@pytest.fixture(scope="module")
def reference_store(tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "reference"
    assert vqtok.cli.main(["encode", "--tokenizer", str(tokenizer_dir), "--out", str(out), *ENCODE_FLAGS]) == 0
    return out


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def encode_cmd(tokenizer_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "vqtok", "encode", "--tokenizer", str(tokenizer_dir), "--out", str(out), *ENCODE_FLAGS]


def test_layout_and_manifest(reference_store, tokenizer_dir):
    manifest = json.loads((reference_store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["kind"] == "discrete" and manifest["num_items"] == 1200
    assert manifest["dtype"] == "uint8" and manifest["vocab_size"] == 16 and manifest["grid"] == [8, 8]
    assert len(manifest["shards"]) == 12 and manifest["has_labels"]
    assert manifest["tokenizer"]["source"] == str(tokenizer_dir.resolve())
    assert manifest["preprocess"] == {"resize": 16, "crop": None}
    codes = np.load(reference_store / "shards" / "codes-00000.npy")
    assert codes.shape == (100, 1, 8, 8) and codes.dtype == np.uint8
    ds = TokenDataset(reference_store, verify=True)
    assert len(ds) == 1200
    codes, label = ds[1199]
    assert codes.dtype == torch.long and codes.shape == (8, 8) and label == build_dataset(
        DataConfig(limit=1200), channels=1, preprocess=PreprocessConfig(resize=16), size=None)[1199][1]


def test_sigkill_at_several_points_then_resume_is_byte_identical(reference_store, tokenizer_dir, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    for shards_before_kill in (1, 4, 8):
        proc = subprocess.Popen(encode_cmd(tokenizer_dir, out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if len(list((out / "shards").glob("?????.json"))) >= shards_before_kill:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait()
        assert not json.loads((out / "manifest.json").read_text())["complete"] or proc.returncode == 0
    assert kills >= 2  # the process really died part-way (it cannot finish 12 shards between two polls)
    with pytest.raises(TokenStoreError, match="incomplete"):
        TokenDataset(out)
    assert subprocess.run(encode_cmd(tokenizer_dir, out), env=env, cwd=ROOT, capture_output=True).returncode == 0
    assert tree(out) == tree(reference_store)


def test_two_processes_write_the_same_store(reference_store, tokenizer_dir, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "scripts" / "encode_two_ranks.py"), str(tokenizer_dir), str(out), *ENCODE_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(Path(f"{out}.world{r}.json").read_text())["world"] for r in range(2)] == [2, 2]
    assert tree(out) == tree(reference_store)


def test_decoded_codes_equal_the_tokenizers_reconstruction(reference_store, tokenizer_dir):
    tok = vqtok.load(tokenizer_dir)
    ds = TokenDataset(reference_store, tokenizer=tok)
    images = build_dataset(DataConfig(limit=8), channels=1, preprocess=tok.config.preprocess, size=None)
    x = tok.preprocess(torch.stack([images[i][0] for i in range(8)]))
    stored = torch.stack([ds[i][0] for i in range(8)])
    assert torch.equal(stored, tok.encode(x))
    assert torch.equal(tok.decode(stored), tok(x).reconstruction)


def test_tampered_truncated_and_mismatched(reference_store, tokenizer_dir, tmp_path):
    store = Path(shutil.copytree(reference_store, tmp_path / "copy"))
    shard = store / "shards" / "codes-00003.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(TokenStoreError, match=r"codes-00003\.npy: 6518 bytes, the manifest records 6528"):
        TokenDataset(store)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    TokenDataset(store)  # sizes match: opening is cheap...
    with pytest.raises(TokenStoreError, match=r"codes-00003\.npy: sha256 does not match"):
        TokenDataset(store, verify=True)  # ...and the checksum finds it
    shard.write_bytes(data)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][0]["count"] = 99
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenStoreError, match="do not add up"):
        TokenDataset(store)
    (store / "manifest.json").write_text("{broken")
    with pytest.raises(TokenStoreError, match="not valid JSON"):
        TokenDataset(store)
    other = make_tokenizer(tmp_path / "other", VQConfig(codebook_size=16, dim=4, kmeans_init=False), seed=1)
    with pytest.raises(TokenStoreError, match="encoded by a tokenizer with weights"):
        TokenDataset(reference_store, tokenizer=vqtok.load(other))
    with pytest.raises(TokenStoreError, match="different arguments"):
        encode_dataset(str(other), DataConfig(limit=1200), reference_store, shard_size=100, batch_size=24,
                       num_workers=0, progress=False)


def test_corrupt_image_in_a_folder_is_named(tokenizer_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), i * 40, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*3\.png"):
        encode_dataset(str(tokenizer_dir), DataConfig(source="folder", path=str(folder)), tmp_path / "store",
                       num_workers=0, progress=False)


def test_gaussian_store_with_flips(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "vae", GaussianConfig(dim=3))
    out = encode_dataset(str(tok_dir), DataConfig(limit=40), tmp_path / "store", shard_size=16, batch_size=8,
                         augmentations=("none", "hflip"), num_workers=0, progress=False)
    ds = TokenDataset(out)
    assert ds.kind == "continuous" and ds.manifest["dtype"] == "float16" and len(ds) == 80
    tok = vqtok.load(tok_dir)
    image = build_dataset(DataConfig(limit=1), channels=1, preprocess=tok.config.preprocess, size=None)[0][0]
    x = tok.preprocess(image[None])
    torch.testing.assert_close(ds[0][0], tok.encode(x).mode()[0].half())
    torch.testing.assert_close(ds[1][0], tok.encode(x.flip(-1)).mode()[0].half())


def test_cli_decode_writes_a_grid(reference_store, tokenizer_dir, tmp_path):
    assert vqtok.cli.main(["decode", str(reference_store), "--out", str(tmp_path / "grid.png"), "--n", "16"]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] >= 4 * 64
    np.save(tmp_path / "codes.npy", np.zeros((4, 8, 8), dtype=np.uint16))
    assert vqtok.cli.main(["decode", str(tmp_path / "codes.npy"), "--tokenizer", str(tokenizer_dir),
                           "--out", str(tmp_path / "g2.png")]) == 0
    assert vqtok.cli.main(["decode", str(tmp_path / "codes.npy"), "--out", str(tmp_path / "g3.png")]) == 1
