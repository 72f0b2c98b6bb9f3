"""The token store: layout, resume after SIGKILL byte for byte, two processes = one, tamper and mismatch errors,
inputs that changed or do not fit one grid, a manifest that contradicts itself or its arrays, out-of-vocabulary codes,
swapped shards, the Hub commit recorded, decoding stored codes = the tokenizer's own reconstruction, and a
hierarchical VAE's store (one latent array per group)."""

import hashlib
import json
import os
import re
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
from tests.test_hub import _hub_cache
from vqtok.config import (
    ConfigError,
    DataConfig,
    GaussianConfig,
    PreprocessConfig,
    PriorConfig,
    PriorTrainConfig,
    VQConfig,
    save_yaml,
)
from vqtok.data import TokenDataset, TokenStoreError, build_dataset, encode_dataset
from vqtok.hub import weights_sha256
from vqtok.models import HierarchicalVAEConfig
from vqtok.train.prior import open_data

ROOT = Path(__file__).resolve().parents[1]
ENCODE_FLAGS = ["--data", "digits", "--limit", "1200", "--shard-size", "100", "--batch-size", "24", "--num-workers", "0"]


def make_tokenizer(path: Path, bottleneck, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    # resize without a crop (explicitly: a crop is the default), so that images of other shapes stay other shapes
    config = tiny_config(bottleneck, in_channels=1, base_channels=16, preprocess=PreprocessConfig(resize=16, crop=None))
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
    assert manifest["preprocess"] == {"resize": 16, "crop": None} and manifest["image_shape"] == [1, 16, 16]
    assert manifest["inputs"]["count"] == 1200 and manifest["inputs"]["hashed"] == "image bytes and labels"
    for record in manifest["shards"]:
        codes = np.load(reference_store / record["files"][0]["path"])
        assert record["code_range"] == [int(codes.min()), int(codes.max())]
    codes = np.load(reference_store / "shards" / "codes-00000.npy")
    assert codes.shape == (100, 1, 8, 8) and codes.dtype == np.uint8
    ds = TokenDataset(reference_store, verify=True)
    assert len(ds) == 1200
    codes, label = ds[1199]
    assert codes.dtype == torch.long and codes.shape == (8, 8) and label == build_dataset(
        DataConfig(limit=1200), channels=1, preprocess=PreprocessConfig(resize=16, crop=None), size=None)[1199][1]


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
    with pytest.raises(TokenStoreError, match="shard 0 holds 99 items; every shard holds shard_size 100"):
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


# ---- inputs: one grid, and the same inputs on a re-run ------------------------------------------------------------


def save_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(len(sizes))
    for name, size in sizes.items():
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / name)
    return folder


def write_idx(path: Path, images: np.ndarray) -> Path:
    """MNIST's IDX format by hand: magic (0, 0, uint8 type 0x08, ndim), big-endian dimensions, the bytes."""
    header = bytes([0, 0, 0x08, images.ndim]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    path.write_bytes(header + images.astype(np.uint8).tobytes())
    return path


@pytest.mark.parametrize("batch_size", [1, 4])  # the odd image alone in its batch, or beside images of the first size
def test_an_image_of_another_size_is_named_and_nothing_is_marked_complete(tokenizer_dir, tmp_path, batch_size):
    sizes = {f"{i}.png": (16, 24) if i == 3 else (16, 16) for i in range(6)}
    folder = save_images(tmp_path / "images", sizes)
    out = tmp_path / "store"
    with pytest.raises(TokenStoreError, match=r"images/3\.png: 1x16x24 torch\.uint8 after the tokenizer's "
                                              r"preprocessing, but this store's images are 1x16x16 .*0\.png"):
        encode_dataset(str(tokenizer_dir), DataConfig(source="folder", path=str(folder)), out, shard_size=2,
                       batch_size=batch_size, num_workers=0, progress=False)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert not (out / "shards" / "00001.json").exists()  # the shard holding 3.png was not written
    with pytest.raises(TokenStoreError, match="incomplete"):
        TokenDataset(out)


def test_a_rerun_on_a_changed_folder_is_refused(tokenizer_dir, tmp_path):
    # The case: encoding stops at a corrupt file after 3 shards; the user removes it and adds two images that
    # sort first. Resuming would keep shards 0-2, now of other images.
    folder = save_images(tmp_path / "images", {f"b{i}.png": (16, 16) for i in range(6)})
    (folder / "b6.png").write_bytes(b"not a png")
    data, out = DataConfig(source="folder", path=str(folder)), tmp_path / "store"

    def encode():
        encode_dataset(str(tokenizer_dir), data, out, shard_size=2, batch_size=2, num_workers=0, progress=False)

    with pytest.raises(ValueError, match=r"cannot read image .*b6\.png"):
        encode()
    assert sorted(p.name for p in (out / "shards").glob("?????.json")) == ["00000.json", "00001.json", "00002.json"]
    (folder / "b6.png").unlink()
    save_images(folder, {"a0.png": (16, 16)})  # the same count (7), other names
    with pytest.raises(TokenStoreError, match=r"store: the input data changed since this store was started \(then 7 "
                                              r"images with relative paths and labels of sha256 (\w+)\.\.\., now 7 "
                                              r"images with relative paths and labels of sha256 (?!\1)"):
        encode()
    save_images(folder, {"a1.png": (16, 16)})
    with pytest.raises(TokenStoreError, match=r"the input data changed .*\(then 7 images.*, now 8 images"):
        encode()


def write_array_source(kind: str, root: Path, images: np.ndarray, labels: np.ndarray) -> DataConfig:
    """IDX files, or the same as a local torchvision MNIST (root/MNIST/raw/, all four files; no download)."""
    if kind == "idx":
        return DataConfig(source="idx", path=str(write_idx(root / "images.idx", images)),
                          labels=str(write_idx(root / "labels.idx", labels)))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return DataConfig(source="torchvision", name="MNIST", path=str(root))


@pytest.mark.parametrize("kind", ["idx", "torchvision"])
def test_a_rerun_on_changed_image_bytes_is_refused(tokenizer_dir, tmp_path, kind):
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16), dtype=np.uint8)
    labels = np.arange(8, dtype=np.uint8) % 3
    data, out = write_array_source(kind, tmp_path, images, labels), tmp_path / "store"

    def encode():
        encode_dataset(str(tokenizer_dir), data, out, shard_size=4, batch_size=4, num_workers=0, progress=False)

    encode()
    before = tree(out)
    encode()  # the same inputs: nothing to do, nothing changed
    assert tree(out) == before
    images[5, 3, 3] ^= 1  # one pixel of one image, the same file size
    write_array_source(kind, tmp_path, images, labels)
    with pytest.raises(TokenStoreError, match=r"the input data changed .*then 8 images with image bytes and labels"):
        encode()
    images[5, 3, 3] ^= 1
    labels[2] = (labels[2] + 1) % 3  # one label
    write_array_source(kind, tmp_path, images, labels)
    with pytest.raises(TokenStoreError, match=r"the input data changed"):
        encode()
    assert tree(out) == before


# ---- a manifest that contradicts itself or its arrays --------------------------------------------------------------


def store_copy(reference_store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reference_store, tmp_path / "copy"))


def edit_manifest(store: Path, edit) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def reseal(record: dict) -> None:
    """What a careful hand edit does: recompute the record's own hash (sha256 of its JSON without that field)."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    record["record_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def swap(items: list, a: int, b: int) -> None:
    items[a], items[b] = items[b], items[a]


def set_vocab(m: dict, vocab: int, tokenizer_too: bool) -> None:
    m["vocab_size"] = vocab
    if tokenizer_too:
        m["tokenizer"]["config"]["vocab_size"] = vocab


def highest_code(m: dict) -> int:
    return max(r["code_range"][1] for r in m["shards"])


@pytest.mark.parametrize("edit, match", [
    (lambda m: swap(m["shards"], 3, 4),
     r"shard record 3 is for shard 4; the records must be shards 0\.\.11, each once, in order \(reordered or "
     r"duplicated records\)"),
    (lambda m: m["shards"].insert(5, m["shards"][4]), r"shard record 5 is for shard 4"),
    (lambda m: m["shards"][4].update(start=350), r"shard 4 starts at item 350, but the shards before it end at item "
                                                 r"400 \(overlapping or missing items\)"),
    (lambda m: m["shards"].pop(), r"the shards hold 1100 items, num_items is 1200"),
    (lambda m: m["shards"][2].update(inputs_sha256="0" * 64), r"shard 2's record does not match its record_sha256"),
])
def test_shard_records_out_of_order_duplicated_or_overlapping_are_refused(reference_store, tmp_path, edit, match):
    store = store_copy(reference_store, tmp_path)
    edit_manifest(store, edit)
    with pytest.raises(TokenStoreError, match=r"manifest\.json: " + match):
        TokenDataset(store)


@pytest.mark.parametrize("edit, match", [
    (lambda m: set_vocab(m, 300, tokenizer_too=True),
     r"manifest\.json: dtype uint8, but codes of a 300-code vocabulary are stored as uint16"),
    (lambda m: set_vocab(m, highest_code(m), tokenizer_too=True),  # codes the arrays hold fall outside the vocabulary
     r"codes-\d{5}\.npy: its record gives codes in \[\d+, (\d+)\], outside the vocabulary 0\.\.\d+ of the manifest"),
    (lambda m: set_vocab(m, 8, tokenizer_too=False),
     r"manifest\.json: vocab_size 8, but the recorded tokenizer has 16"),
    (lambda m: m.update(grid=[4, 4]), r"manifest\.json: grid \[4, 4\] is not one view's code shape"),
    (lambda m: m.update(grid=[4, 4], item_shape=[1, 4, 4]),
     r"codes-00000\.npy: uint8 \[100, 1, 8, 8\], the manifest declares uint8 \[100, 1, 4, 4\]"),
    (lambda m: m.update(augmentations=["none", "hflip"]),
     r"manifest\.json: items hold 1 view\(s\) \(item_shape \[1, 8, 8\]\) but augmentations lists 2"),
    (lambda m: m.update(augmentations=["none", "hflip"], item_shape=[2, 8, 8]),
     r"codes-00000\.npy: uint8 \[100, 1, 8, 8\], the manifest declares uint8 \[100, 2, 8, 8\]"),
    (lambda m: m.update(augmentations=["hflip"]), r"manifest\.json: augmentations \['hflip'\] must start with 'none'"),
    (lambda m: m.update(kind="continuous"), r"manifest\.json: item_shape \[1, 8, 8\] is not a continuous store's"),
    (lambda m: m.update(kind="latents"), r"manifest\.json: kind is 'latents'"),
    (lambda m: m.update(dtype="uint16"), r"manifest\.json: dtype uint16, but codes of a 16-code vocabulary are stored "
                                         r"as uint8"),
])
def test_declared_fields_that_disagree_with_each_other_or_the_arrays_are_refused(reference_store, tmp_path, edit,
                                                                                  match):
    store = store_copy(reference_store, tmp_path)
    edit_manifest(store, edit)
    with pytest.raises(TokenStoreError, match=match):
        TokenDataset(store)


# ---- codes outside the vocabulary, swapped shards -----------------------------------------------------------------


def prior_config(store: Path, out: Path, **overrides) -> PriorTrainConfig:
    settings = dict(prior=PriorConfig(n_layer=1, n_head=1, n_embd=8), tokens=str(store), output_dir=str(out),
                    max_steps=1, batch_size=4, eval_every=1, checkpoint_every=1, log_every=1, num_samples=1,
                    eval_items=4)
    return PriorTrainConfig(**{**settings, **overrides})


def test_a_code_outside_the_vocabulary_never_leaves_the_store(reference_store, tmp_path):
    store = store_copy(reference_store, tmp_path)
    path = store / "shards" / "codes-00005.npy"
    codes = np.load(path)
    codes[7, 0, 2, 3] = 16  # the vocabulary is 0..15; the dtype (uint8) holds it
    np.save(path, codes)

    def fix_up(m):  # only the code range can tell: the size, the checksum and the record's hash are made to fit
        m["shards"][5]["files"][0].update(bytes=path.stat().st_size, sha256=file_sha256(path))
        reseal(m["shards"][5])

    edit_manifest(store, fix_up)
    ds = TokenDataset(store)  # opening reads no codes...
    codes, _ = ds.gather(np.arange(500))  # ...nor does reading shards 0-4 check shard 5
    assert int(codes.max()) < 16
    message = r"codes-00005\.npy: holds code 16, outside the vocabulary 0\.\.15 \(a corrupted shard\)"
    with pytest.raises(TokenStoreError, match=message):
        ds.gather([507])  # shard 5's codes are checked before their first read
    with pytest.raises(TokenStoreError, match=message):
        ds[550]
    with pytest.raises(TokenStoreError, match=message):
        TokenDataset(store, verify=True)
    with pytest.raises(TokenStoreError, match=message):
        open_data(prior_config(store, tmp_path / "run"), None)  # before any batch reaches the prior

    def claim_it(m):  # the record says so too: then opening alone refuses it
        m["shards"][5]["code_range"][1] = 16
        reseal(m["shards"][5])

    edit_manifest(store, claim_it)
    with pytest.raises(TokenStoreError, match=r"codes-00005\.npy: its record gives codes in \[\d+, 16\], outside the "
                                              r"vocabulary 0\.\.15"):
        TokenDataset(store)


def test_codes_outside_their_recorded_range_are_refused(reference_store, tmp_path):
    store = store_copy(reference_store, tmp_path)
    record = json.loads((store / "manifest.json").read_text())["shards"][2]
    low, high = record["code_range"]
    assert low > 0 or high < 15  # a code in the vocabulary that the record rules out exists
    path = store / "shards" / "codes-00002.npy"
    codes = np.load(path)
    codes[0, 0, 0, 0] = 0 if low > 0 else 15
    np.save(path, codes)
    def fix_up(m):  # the checksum and the record's hash made to fit
        m["shards"][2]["files"][0].update(sha256=file_sha256(path))
        reseal(m["shards"][2])

    edit_manifest(store, fix_up)
    with pytest.raises(TokenStoreError, match=r"codes-00002\.npy: codes span \[\d+, \d+\], its record says "
                                              rf"\[{low}, {high}\] \(a corrupted or replaced shard\)"):
        TokenDataset(store, verify=True)


def test_swapped_shards_are_caught(reference_store, tmp_path):
    store = store_copy(reference_store, tmp_path)
    for kind in ("codes", "labels"):  # shards 3 and 4 hold 100 items each: files of the same size
        a, b = store / "shards" / f"{kind}-00003.npy", store / "shards" / f"{kind}-00004.npy"
        a.rename(store / "tmp")
        b.rename(a)
        (store / "tmp").rename(b)
    TokenDataset(store)  # sizes and shapes fit: opening is cheap...
    with pytest.raises(TokenStoreError, match=r"codes-00003\.npy: sha256 does not match the manifest"):
        TokenDataset(store, verify=True)  # ...and the checksums find it

    manifest = (store / "manifest.json").read_text()

    def swap_checksums(m):  # the files' checksums follow the files: now only the record's own hash can tell
        for i in range(2):
            first, second = m["shards"][3]["files"][i], m["shards"][4]["files"][i]
            first["sha256"], second["sha256"] = second["sha256"], first["sha256"]

    edit_manifest(store, swap_checksums)
    with pytest.raises(TokenStoreError, match=r"shard 3's record does not match its record_sha256 \(edited, or mixed "
                                              r"with another shard's\)"):
        TokenDataset(store, verify=True)

    def swap_file_lists(m):  # whole file entries with their names, the record hashes recomputed
        swap_files = m["shards"][3]["files"], m["shards"][4]["files"]
        m["shards"][3]["files"], m["shards"][4]["files"] = swap_files[1], swap_files[0]
        reseal(m["shards"][3])
        reseal(m["shards"][4])

    (store / "manifest.json").write_text(manifest)
    edit_manifest(store, swap_file_lists)
    with pytest.raises(TokenStoreError, match=r"shard 3's record does not list its files \['shards/codes-00003\.npy', "
                                              r"'shards/labels-00003\.npy'\]"):
        TokenDataset(store)


# ---- train-prior --verify, and the Hub commit -----------------------------------------------------------------------


def test_train_prior_verify_checks_the_stores_checksums(reference_store, tmp_path, capsys):
    store = store_copy(reference_store, tmp_path)
    path = store / "shards" / "labels-00001.npy"
    data = bytearray(path.read_bytes())
    data[-8] ^= 1  # one label's lowest bit: a valid label still, the same size
    path.write_bytes(bytes(data))
    assert open_data(prior_config(store, tmp_path / "a"), None).train.num_images == 1200  # sizes and codes fit
    with pytest.raises(TokenStoreError, match=r"labels-00001\.npy: sha256 does not match"):
        open_data(prior_config(store, tmp_path / "a", verify_tokens=True), None)
    save_yaml(prior_config(store, tmp_path / "run"), tmp_path / "prior.yaml")
    assert vqtok.cli.main(["train-prior", str(tmp_path / "prior.yaml"), "--verify"]) == 1
    assert "labels-00001.npy: sha256 does not match" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert vqtok.cli.main(["train-prior", str(tmp_path / "prior.yaml"), "--verify", "--set",
                           "verify_tokens=false"]) == 1
    assert "--verify and --set verify_tokens=... both given" in capsys.readouterr().err


def test_a_store_encoded_from_a_hub_branch_records_the_commit(tokenizer_dir, tmp_path):
    commit = "d" * 40
    cache = _hub_cache(tmp_path / "hub", "org/tiny-tok", tokenizer_dir, commit)  # refs/main -> commit
    out = tmp_path / "store"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "vqtok", "encode", "--tokenizer", "org/tiny-tok@main", "--out",
                             str(out), "--data", "digits", "--limit", "8", "--num-workers", "0"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert (tokenizer["source"], tokenizer["revision"]) == ("org/tiny-tok", commit)


# ---- the layout of single-grid stores is what it was; a hierarchical VAE's store -------------------------------------

SINGLE_GRID_KEYS = ["format", "format_version", "complete", "vqtok_version", "num_items", "kind", "vocab_size", "dtype",
                    "item_shape", "grid", "image_shape", "augmentations", "has_labels", "preprocess", "tokenizer",
                    "args", "inputs", "shards"]


def shard_names(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "shards").iterdir())


@pytest.mark.parametrize("bottleneck", ["vq", "gaussian"])
def test_single_grid_stores_keep_their_layout(reference_store, tmp_path, bottleneck):
    # The manifest of format version 2 as it was before hierarchical stores: these keys in this order, as indented
    # JSON, one codes file per shard, the same record fields (a byte comparison with the code of the time gave equal
    # files for VQ and Gaussian stores, with and without flips)
    names = ["codes", "labels"]
    if bottleneck == "vq":
        store = reference_store
    else:
        tok_dir = make_tokenizer(tmp_path / "vae", GaussianConfig(dim=3))
        store = encode_dataset(str(tok_dir), DataConfig(limit=40), tmp_path / "store", shard_size=16, batch_size=8,
                               num_workers=0, progress=False)
    text = (store / "manifest.json").read_text()
    manifest = json.loads(text)
    assert list(manifest) == SINGLE_GRID_KEYS and text == json.dumps(manifest, indent=2) + "\n"
    assert manifest["format_version"] == 2
    count = len(manifest["shards"])
    assert shard_names(store) == sorted([f"{s:05d}.json" for s in range(count)]
                                        + [f"{n}-{s:05d}.npy" for n in names for s in range(count)])
    record_keys = ["index", "start", "count", "inputs_sha256", "code_range", "files", "record_sha256"]
    for s, record in enumerate(manifest["shards"]):
        assert list(record) == [k for k in record_keys if bottleneck == "vq" or k != "code_range"]
        assert [(f["kind"], f["path"]) for f in record["files"]] == [(n, f"shards/{n}-{s:05d}.npy") for n in names]
        assert all(list(f) == ["kind", "path", "bytes", "sha256"] for f in record["files"])
    ds = TokenDataset(store)
    assert ds.group_shapes is None and ds.grid == tuple(manifest["grid"]) and torch.is_tensor(ds[0][0])


HVAE = HierarchicalVAEConfig(in_channels=1, resolution=8, scales=(4, 2), groups_per_scale=(1, 1), latent_channels=2,
                             width=8, encoder_cells=1, cells_per_group=1, preprocess=PreprocessConfig(resize=8))
GROUPS = [[2, 2, 2], [2, 4, 4]]


def make_hierarchical(path: Path, seed: int = 0) -> Path:
    """A tiny hierarchical VAE whose posteriors depend on the image (untrained, its zero-initialised posterior layers
    would give every group's mean 0 for every image)."""
    torch.manual_seed(seed)
    model = vqtok.HierarchicalVAE(HVAE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def encode_hierarchical(tok_dir: Path, out: Path, **overrides) -> Path:
    args = {"shard_size": 16, "batch_size": 8, "augmentations": ("none", "hflip"), "num_workers": 0, "progress": False}
    return encode_dataset(str(tok_dir), DataConfig(limit=40), out, **{**args, **overrides})


@pytest.fixture(scope="module")
def hvae_dir(tmp_path_factory):
    return make_hierarchical(tmp_path_factory.mktemp("tok") / "hvae")


@pytest.fixture(scope="module")
def hvae_store(hvae_dir, tmp_path_factory):
    return encode_hierarchical(hvae_dir, tmp_path_factory.mktemp("stores") / "hvae")


def test_hierarchical_store_holds_every_groups_posterior_mean(hvae_store, hvae_dir):
    manifest = json.loads((hvae_store / "manifest.json").read_text())
    assert manifest["groups"] == GROUPS and "item_shape" not in manifest and "grid" not in manifest
    assert manifest["format_version"] == 3  # an older vqtok refuses it as a newer format
    assert (manifest["kind"], manifest["dtype"], manifest["vocab_size"]) == ("continuous", "float16", None)
    assert shard_names(hvae_store) == sorted([f"{s:05d}.json" for s in range(3)] + [
        f"{n}-{s:05d}.npy" for n in ("latents-g0", "latents-g1", "labels") for s in range(3)])
    assert [f["kind"] for f in manifest["shards"][2]["files"]] == ["latents-g0", "latents-g1", "labels"]
    tok = vqtok.load(hvae_dir)
    ds = TokenDataset(hvae_store, tokenizer=tok, verify=True)
    assert len(ds) == 80 and ds.group_shapes == ((2, 2, 2), (2, 4, 4)) and ds.grid is None
    images = build_dataset(DataConfig(limit=40), channels=1, preprocess=HVAE.preprocess, size=None)
    x = tok.preprocess(torch.stack([images[i][0] for i in range(16, 24)]))  # the store's batch 2 (shard 1)
    for aug, view in enumerate((x, x.flip(-1))):
        stored, labels = ds.gather(np.arange(16, 24) * 2 + aug)
        expected = [q.mode().half() for q in tok.encode(view)]
        assert isinstance(stored, tuple) and len(stored) == 2
        for group, want in zip(stored, expected):
            assert group.dtype == torch.float16 and group.abs().max() > 0.1
            assert torch.equal(group, want)  # the same batch as the store's, the same arithmetic
        assert labels.tolist() == [images[i][1] for i in range(16, 24)]
    item, label = ds[2 * 17 + 1]
    assert isinstance(item, tuple) and [list(t.shape) for t in item] == GROUPS and label == images[17][1]
    assert torch.equal(item[1], ds.gather([2 * 17 + 1])[0][1][0])
    torch.testing.assert_close(tok.decode([z[:1].float() for z in stored]), tok.reconstruct(x.flip(-1)[:1]),
                               atol=2e-2, rtol=0)


def test_hierarchical_store_resumes_byte_for_byte_and_refuses_other_arguments(hvae_store, hvae_dir, tmp_path):
    store = store_copy(hvae_store, tmp_path)
    before = tree(store)
    (store / "shards" / "latents-g1-00001.npy").unlink()  # one group's file of one shard...
    (store / "shards" / "00002.json").unlink()  # ...and another shard's record
    encode_hierarchical(hvae_dir, store)
    assert tree(store) == before
    with pytest.raises(TokenStoreError, match=r"different arguments \(shard_size\)"):
        encode_hierarchical(hvae_dir, store, shard_size=8)
    other = make_hierarchical(tmp_path / "other", seed=1)
    with pytest.raises(TokenStoreError, match=r"different arguments \(tokenizer\)"):
        encode_hierarchical(other, store)
    with pytest.raises(TokenStoreError, match="encoded by a tokenizer with weights"):
        TokenDataset(store, tokenizer=vqtok.load(other))


@pytest.mark.slow
def test_two_processes_write_the_same_hierarchical_store(hvae_dir, tmp_path):
    # Against one process under the same thread count: float latents may differ in their last bit between thread
    # counts (the integer codes of the VQ test do not)
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--data", "digits", "--limit", "40", "--shard-size", "16", "--batch-size", "8", "--hflip",
             "--num-workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for cmd in ([sys.executable, "-m", "vqtok", "encode", "--tokenizer", str(hvae_dir), "--out", str(one), *flags],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(ROOT / "tests" / "scripts" / "encode_two_ranks.py"), str(hvae_dir), str(two), *flags]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(Path(f"{two}.world{r}.json").read_text())["world"] for r in range(2)] == [2, 2]
    assert tree(two) == tree(one)


def test_hierarchical_store_corrupted_group_shard_is_found(hvae_store, tmp_path):
    store = store_copy(hvae_store, tmp_path)
    path = store / "shards" / "latents-g1-00001.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of one latent of the second group
    TokenDataset(store)  # sizes and headers fit
    with pytest.raises(TokenStoreError, match=r"latents-g1-00001\.npy: sha256 does not match the manifest"):
        TokenDataset(store, verify=True)
    latents = np.load(path)
    latents[3, 1, 0, 2, 2] = np.nan
    np.save(path, latents)

    def fix_up(m):  # only the values can tell: the checksum and the record's hash are made to fit
        m["shards"][1]["files"][1].update(sha256=file_sha256(path))
        reseal(m["shards"][1])

    edit_manifest(store, fix_up)
    ds = TokenDataset(store)
    ds.gather(np.arange(32))  # shard 0 is read; shard 1's values are checked before their first read
    message = r"latents-g1-00001\.npy: holds NaN or infinite latents \(a corrupted shard\)"
    with pytest.raises(TokenStoreError, match=message):
        ds[40]
    with pytest.raises(TokenStoreError, match=message):
        TokenDataset(store, verify=True)


def test_hierarchical_store_wrong_group_shape_is_refused_on_open(hvae_store, tmp_path):
    store = store_copy(hvae_store, tmp_path)
    path = store / "shards" / "latents-g0-00000.npy"
    size = path.stat().st_size
    np.save(path, np.load(path).reshape(16, 2, 2, 1, 4))  # the same bytes and header length, another shape
    assert path.stat().st_size == size
    with pytest.raises(TokenStoreError, match=r"latents-g0-00000\.npy: float16 \[16, 2, 2, 1, 4\], the manifest "
                                              r"declares float16 \[16, 2, 2, 2, 2\] \(count, augmentations, "
                                              r"groups\[0\]\)"):
        TokenDataset(store)


def as_one_grid(m: dict) -> None:
    del m["groups"]
    m.update(grid=[2, 2], item_shape=[2, 2, 2, 2])


def name_group_file_codes(m: dict) -> None:
    m["shards"][0]["files"][1]["path"] = "shards/codes-00000.npy"


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(groups=[[2, 2, 2], [2, 2, 2]]),
     (r"groups \[\[2, 2, 2\], \[2, 2, 2\]\], but the recorded tokenizer's latent_shapes are "
      r"\[\[2, 2, 2\], \[2, 4, 4\]\]")),
    (lambda m: m.update(groups=[[2, 2]]), r"groups \[\[2, 2\]\] is not a list of every latent group's \[C, h, w\]"),
    (lambda m: m.update(grid=[2, 2]), r"declares both groups and grid"),
    (lambda m: m.update(kind="discrete"), r"a discrete store with latent groups"),
    (lambda m: m.pop("groups"), r"format version 3 without latent groups"),
    (lambda m: (m.pop("groups"), m.update(format_version=2)), r"malformed manifest \(missing: grid, item_shape\)"),
    (lambda m: (as_one_grid(m), m.update(format_version=2)),
     r"one grid \(item_shape \[2, 2, 2, 2\]\), but the recorded tokenizer has latent groups"),
    (lambda m: m.update(format_version=2), r"format version 2 with latent groups"),
    (name_group_file_codes,
     (r"shard 0's record does not list its files \['shards/latents-g0-00000\.npy', 'shards/latents-g1-00000\.npy', "
      r"'shards/labels-00000\.npy'\]")),
])
def test_hierarchical_manifest_that_contradicts_itself_is_refused(hvae_store, tmp_path, edit, match):
    store = store_copy(hvae_store, tmp_path)
    edit_manifest(store, edit)
    with pytest.raises(TokenStoreError, match=r"manifest\.json: " + match):
        TokenDataset(store)


def test_non_finite_latents_are_not_written(tmp_path):
    torch.manual_seed(0)
    model = vqtok.HierarchicalVAE(HVAE)
    with torch.no_grad():
        model.top_bias.fill_(float("nan"))
    with pytest.raises(TokenStoreError, match=r"digits image 0: its latents of group 0 hold NaN or infinite "
                                              r"values in float16"):
        encode_dataset(model, build_dataset(DataConfig(limit=4), channels=1, preprocess=HVAE.preprocess, size=None),
                       tmp_path / "store", num_workers=0, progress=False)
    assert not (tmp_path / "store" / "shards" / "00000.json").exists()


def test_hierarchical_store_loads_its_tokenizer_decodes_and_is_refused_by_a_prior(hvae_store, hvae_dir, tmp_path,
                                                                                   capsys):
    tok = TokenDataset(hvae_store).load_tokenizer()
    assert isinstance(tok, vqtok.HierarchicalVAE)
    assert vqtok.cli.main(["decode", str(hvae_store), "--out", str(tmp_path / "grid.png"), "--n", "4"]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] >= 2 * 8
    assert vqtok.cli.main(["decode", str(hvae_store), "--tokenizer", str(hvae_dir), "--out",
                           str(tmp_path / "g2.png")]) == 0
    assert Image.open(tmp_path / "g2.png").tobytes() != Image.open(tmp_path / "grid.png").tobytes()  # 40 images, not 4
    np.save(tmp_path / "latents.npy", np.zeros((4, 2, 2, 2), dtype=np.float32))
    capsys.readouterr()
    assert vqtok.cli.main(["decode", str(tmp_path / "latents.npy"), "--tokenizer", str(hvae_dir), "--out",
                           str(tmp_path / "g3.png")]) == 1
    assert "latents.npy: a .npy file holds one grid, but" in capsys.readouterr().err
    with pytest.raises(TokenStoreError, match=r"holds continuous latents \(a Gaussian tokenizer or hierarchical VAE\); "
                                              r"a prior needs codes"):
        open_data(prior_config(hvae_store, tmp_path / "run"), None)


# ---- where the tokenizer is: relative to the store, moved, pointed at ------------------------------------------------


def small_store(tok: Path, out: Path) -> Path:
    return encode_dataset(str(tok), DataConfig(limit=40), out, shard_size=20, batch_size=20, num_workers=0,
                          progress=False)


def test_a_store_moved_together_with_its_tokenizer_still_finds_it(tmp_path):
    """The store records its tokenizer's folder relative to itself (and absolutely, for older vqtok and as a
    fallback): moved together, or the store alone, it still finds it; a store of older vqtok (an absolute path
    only) too. Every time the weights found are checked against the record."""
    tok = make_tokenizer(tmp_path / "a" / "tok", VQConfig(codebook_size=16, dim=4, kmeans_init=False))
    store = small_store(tok, tmp_path / "a" / "stores" / "digits")
    identity = TokenDataset(store).tokenizer_identity
    assert identity["source"] == str(tok.resolve()) and identity["source_relative"] == "../../tok"
    edit_manifest(store, lambda m: m["args"]["tokenizer"].pop("source_relative"))  # as older vqtok wrote it
    small_store(tok, store)  # re-run (resume) by this vqtok: the same arguments
    expected = weights_sha256(vqtok.load(tok))
    (tmp_path / "a").rename(tmp_path / "b")  # store and tokenizer together: the absolute path is gone
    moved = tmp_path / "b" / "stores" / "digits"
    assert weights_sha256(TokenDataset(moved).load_tokenizer()) == expected
    (tmp_path / "b" / "stores").rename(tmp_path / "stores")  # the store alone: the relative path leads nowhere
    (tmp_path / "b").rename(tmp_path / "a")  # ... and the tokenizer back where the record's absolute path says
    alone = tmp_path / "stores" / "digits"
    assert weights_sha256(TokenDataset(alone).load_tokenizer()) == expected
    edit_manifest(alone, lambda m: m["tokenizer"].pop("source_relative"))  # as older vqtok wrote it
    assert weights_sha256(TokenDataset(alone).load_tokenizer()) == expected
    (tmp_path / "a").rename(tmp_path / "c")
    with pytest.raises(TokenStoreError, match=rf"is not at {tok.resolve()}; if its folder moved, say where"):
        TokenDataset(alone).load_tokenizer()


def test_a_moved_tokenizer_is_named_with_its_hash_and_can_be_pointed_at(tmp_path, capsys):
    """Its folder moved: the error names where the store looked and the weights' sha256, and how to say where it is
    now; `tokenizer:` (or train-prior --tokenizer) points at it - a tokenizer with other weights is refused, both
    hashes shown -, and a resumed run may point at yet another place."""
    tok = make_tokenizer(tmp_path / "tok", VQConfig(codebook_size=16, dim=4, kmeans_init=False))
    expected = weights_sha256(vqtok.load(tok))
    store = small_store(tok, tmp_path / "store")
    tok.rename(tmp_path / "moved")
    moved = tmp_path / "moved"
    with pytest.raises(TokenStoreError, match=(
            rf"{store}: the tokenizer that made this store \(weights sha256 {expected}\) is not at \.\./tok from the "
            rf"store \({tok.resolve()}\) nor at {tok.resolve()}; if its folder moved, say where: `tokenizer: PATH` in "
            r"the prior's config \(vqtok train-prior --tokenizer PATH\)")):
        TokenDataset(store).load_tokenizer()
    assert weights_sha256(TokenDataset(store).load_tokenizer(moved)) == expected
    other = make_tokenizer(tmp_path / "other", VQConfig(codebook_size=16, dim=4, kmeans_init=False), seed=1)
    wrong = weights_sha256(vqtok.load(other))
    refusal = (f"{store}: encoded by a tokenizer with weights sha256 {expected}, not {other} (weights sha256 "
               f"{wrong})")
    with pytest.raises(TokenStoreError, match=re.escape(refusal)):
        TokenDataset(store).load_tokenizer(other)

    save_yaml(prior_config(store, tmp_path / "run", max_steps=2), tmp_path / "prior.yaml")
    prior_yaml = str(tmp_path / "prior.yaml")
    assert vqtok.cli.main(["train-prior", prior_yaml]) == 1
    assert f"(weights sha256 {expected}) is not at ../tok" in capsys.readouterr().err
    assert vqtok.cli.main(["train-prior", prior_yaml, "--tokenizer", str(other)]) == 1
    assert refusal in capsys.readouterr().err
    assert vqtok.cli.main(["train-prior", prior_yaml, "--tokenizer", str(moved), "--set", f"tokenizer={moved}"]) == 1
    assert "--tokenizer and --set tokenizer=... both given" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert vqtok.cli.main(["train-prior", prior_yaml, "--tokenizer", str(moved), "--stop-at", "1"]) == 0
    moved.rename(tmp_path / "again")
    assert vqtok.cli.main(["train-prior", prior_yaml, "--resume", "--set", f"tokenizer={tmp_path / 'again'}"]) == 0
    prior = vqtok.load(tmp_path / "run" / "prior")
    assert weights_sha256(prior.load_tokenizer()) == expected  # the copy in prior/tokenizer
    with pytest.raises(ConfigError, match="tokenizer is set in the config .* and a tokenizer was passed"):
        open_data(prior_config(store, tmp_path / "x", tokenizer=str(tmp_path / "again")),
                  vqtok.load(tmp_path / "again"))


# ---- speed options: compile, bf16, channels_last, workers -----------------------------------------------------------


def speed_store(tok, out: Path, **options) -> Path:
    return encode_dataset(tok, DataConfig(limit=48), out, **{"shard_size": 24, "batch_size": 16, "num_workers": 0,
                                                              "progress": False, **options})


def test_compiled_encode_writes_the_eager_store_and_leaves_the_model_uncompiled(tokenizer_dir, tmp_path):
    """compile=True (CPU inductor here) gives the eager store byte for byte: the same codes (exactly, on this model:
    a code could differ only where two are equally near within float rounding) and the same manifest (compile is not
    recorded). The model passed in is left uncompiled and its weights unchanged."""
    from torch._dynamo.utils import counters

    tok = vqtok.load(tokenizer_dir)
    before = weights_sha256(tok)
    eager = speed_store(tok, tmp_path / "eager")
    counters.clear()
    compiled = speed_store(tok, tmp_path / "compiled", compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the encoder really ran compiled
    assert tree(compiled) == tree(eager)
    assert len(np.unique(TokenDataset(compiled).gather(np.arange(48))[0])) > 1  # codes that could differ
    assert tok.encoder._compiled_call_impl is None and tok.quant_conv._compiled_call_impl is None
    assert weights_sha256(tok) == before
    speed_store(tok, tmp_path / "eager", compile=True)  # resuming with compile is allowed (not recorded)


def test_bf16_is_recorded_and_a_resume_in_another_precision_is_refused(tokenizer_dir, tmp_path):
    tok = vqtok.load(tokenizer_dir)
    bf16 = speed_store(tok, tmp_path / "bf16", precision="bf16")
    manifest = json.loads((bf16 / "manifest.json").read_text())
    assert manifest["args"]["precision"] == "bf16" and TokenDataset(bf16).precision == "bf16"
    images = build_dataset(DataConfig(limit=16), channels=1, preprocess=tok.config.preprocess, size=None)
    x = tok.preprocess(torch.stack([images[i][0] for i in range(16)]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = tok.encode(x)  # the store's first batch under the same autocast
    assert torch.equal(TokenDataset(bf16).gather(np.arange(16))[0], expected)
    float32 = speed_store(tok, tmp_path / "float32")
    assert "precision" not in json.loads((float32 / "manifest.json").read_text())["args"]  # as older vqtok wrote
    assert TokenDataset(float32).precision == "float32"
    with pytest.raises(TokenStoreError, match=r"different arguments \(precision\) - it was encoded in precision "
                                              r"bf16, this run is float32: give the store's to resume -"):
        speed_store(tok, bf16)
    with pytest.raises(TokenStoreError, match=r"different arguments \(precision\) - it was encoded in precision "
                                              r"float32, this run is bf16"):
        speed_store(tok, float32, precision="bf16")
    before = tree(bf16)
    (bf16 / "shards" / "00001.json").unlink()
    speed_store(tok, bf16, precision="bf16")  # the same precision resumes, byte for byte
    assert tree(bf16) == before
    edit_manifest(bf16, lambda m: m["args"].update(precision="fp16"))
    with pytest.raises(TokenStoreError, match=r"args\.precision 'fp16' is not one of \('float32', 'bf16'\)"):
        TokenDataset(bf16)


def test_channels_last_encoder_gives_the_same_codes_and_is_undone(tokenizer_dir):
    """What encode_dataset does on CUDA, checked on the CPU: the encoder in channels_last, the input too."""
    from vqtok.data.token_store import _encode_batch, _encoder_prepared

    tok = vqtok.load(tokenizer_dir)
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    eager = _encode_batch(tok, images, ("none", "hflip"))
    with _encoder_prepared(tok, compile=False, channels_last=True):
        assert not tok.encoder.conv_out.weight.is_contiguous()  # [8, 32, 3, 3]: the layouts differ
        fast = _encode_batch(tok, images, ("none", "hflip"), channels_last=True)
    assert tok.encoder.conv_out.weight.is_contiguous()
    np.testing.assert_array_equal(fast[0], eager[0])


@pytest.mark.parametrize("options, error, match", [
    ({"precision": "fp16"}, ValueError, r"unknown precision 'fp16'; choose from \('float32', 'bf16'\)"),
    ({"compile": "yes"}, TypeError, r"compile must be True or False, got 'yes'"),
    ({"num_workers": -1}, ValueError, r"num_workers must be an integer >= 0 \(or None for the default\), got -1"),
])
def test_bad_speed_options_are_refused_in_one_line(tokenizer_dir, tmp_path, options, error, match):
    with pytest.raises(error, match=match) as caught:
        speed_store(str(tokenizer_dir), tmp_path / "store", **options)
    assert "\n" not in str(caught.value) and not (tmp_path / "store").exists()


def test_speed_options_a_model_cannot_honour_are_refused(hvae_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"compile=True compiles an autoencoder's encoder; a hierarchical VAE's "
                                         r"encoding is not compiled: use compile=False"):
        encode_hierarchical(hvae_dir, tmp_path / "hvae", compile=True)
    torch.manual_seed(0)
    upcast = vqtok.Autoencoder(tiny_config(GaussianConfig(dim=3), in_channels=1, force_upcast=True,
                                           preprocess=PreprocessConfig(resize=16, crop=None)))
    with pytest.raises(ValueError, match=r"precision 'bf16': this tokenizer sets force_upcast .* use precision "
                                         r"'float32'"):
        speed_store(upcast, tmp_path / "upcast", precision="bf16")
    assert not (tmp_path / "hvae").exists() and not (tmp_path / "upcast").exists()
    assert vqtok.cli.main(["encode", "--tokenizer", str(hvae_dir), "--out", str(tmp_path / "x"), "--data", "digits",
                           "--precision", "fp16"]) != 0
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_default_workers_keep_a_gpu_fed_and_share_the_cpus(monkeypatch):
    from vqtok.data.token_store import default_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (default_num_workers("cuda"), default_num_workers("cpu")) == (8, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun, 8 processes on this node: 4 CPUs each
    assert (default_num_workers("cuda"), default_num_workers(torch.device("cpu"))) == (4, 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_num_workers("cuda") == 1
