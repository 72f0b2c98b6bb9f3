"""Which images a DataConfig gives (offset and limit, against the raw source arrays) and how they are binarized:
'once' (a fixed set: the same at every read, keyed by the image's index in the source) and 'dynamic' (the training
loop's `dynamic_binarize`, drawn afresh at every step), each pixel a Bernoulli(pixel / 255) draw."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqtok
from tests.test_token_store import make_tokenizer, write_array_source, write_idx
from vqtok.config import ConfigError, DataConfig, PreprocessConfig, TrainConfig, VQConfig, from_dict
from vqtok.data import TokenDataset, TokenStoreError, build_dataset, encode_dataset
from vqtok.data.sources import BINARIZE_STREAM, binarize, dynamic_binarize
from vqtok.data.token_store import input_identity
from vqtok.images import resize_and_crop, uint8_to_range
from vqtok.seeds import keyed_seed


def dataset(config: DataConfig, size: int | None = None):
    return build_dataset(config, channels=1, preprocess=PreprocessConfig(resize=None, crop=None), size=size)


def items(data) -> tuple[np.ndarray, list[int]]:
    pairs = [data[i] for i in range(len(data))]
    return np.stack([image[0].numpy() for image, _ in pairs]), [label for _, label in pairs]


def grey_images(count: int = 12, side: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, side, side), dtype=np.uint8), rng.integers(0, 10, count, dtype=np.uint8)


# ---- offset and limit -------------------------------------------------------------------------------------------


def write_source(kind: str, root: Path, images: np.ndarray, labels: np.ndarray) -> DataConfig:
    """The images as IDX files, a local torchvision MNIST, or a folder of PNGs whose sorted names keep their order
    (labels -1)."""
    if kind != "folder":
        return write_array_source(kind, root, images, labels)
    folder = root / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return DataConfig(source="folder", path=str(folder))


@pytest.mark.parametrize("kind", ["idx", "torchvision", "folder"])
def test_offset_and_limit_give_the_source_images_from_offset_on(tmp_path, kind):
    images, labels = grey_images()
    base = write_source(kind, tmp_path, images, labels)
    expected_labels = labels.tolist() if kind != "folder" else [-1] * len(images)
    for offset, limit in [(0, None), (0, 5), (3, None), (3, 4), (9, 100), (11, 1)]:
        data = dataset(DataConfig(**{**base.__dict__, "offset": offset, "limit": limit}))
        stop = len(images) if limit is None else min(offset + limit, len(images))
        got, got_labels = items(data)
        assert np.array_equal(got, images[offset:stop]), (offset, limit)
        assert got_labels == data.labels == expected_labels[offset:stop]
        assert data.source.first == offset
    last = dataset(DataConfig(**{**base.__dict__, "offset": 7, "limit": 2}))
    assert last.source.describe(1) == (f"{tmp_path / 'images' / '008.png'}" if kind == "folder"
                                       else f"{'MNIST' if kind == 'torchvision' else base.path} image 8")


def test_an_image_of_the_wrong_size_is_named_by_its_index_in_the_source(tmp_path):
    images = grey_images()[0]
    config = DataConfig(source="idx", path=str(write_idx(tmp_path / "i.idx", images)), offset=5, limit=3)
    with pytest.raises(ValueError, match=r"i\.idx image 6 is 8x8 after preprocessing \(resize None, crop None\), "
                                         r"the model trains on 16x16"):
        dataset(config, size=16)[1]


def test_an_offset_beyond_the_source_is_an_error_naming_its_size(tmp_path):
    path = str(write_idx(tmp_path / "i.idx", grey_images()[0]))
    dataset(DataConfig(source="idx", path=path, offset=11))  # the last image
    for offset in (12, 10**9):
        with pytest.raises(ValueError, match=rf"data.offset {offset} is beyond the end of data source 'idx' "
                                             rf"\(.*i\.idx\), which holds 12 images"):
            dataset(DataConfig(source="idx", path=path, offset=offset))


@pytest.mark.parametrize("fields, message", [
    ({"offset": -1}, "offset must be >= 0, got -1"),
    ({"binarize": "twice"}, "'binarize' must be one of"),
    ({"binarize": "once", "binarize_seed": -1}, r"binarize_seed must be in \[0, 2\^32\), got -1"),
    ({"binarize": "once", "binarize_seed": 2**32}, r"binarize_seed must be in \[0, 2\^32\)"),
    ({"binarize_seed": 3}, r"binarize_seed \(3\) is used only with binarize 'once' or 'dynamic'"),
])
def test_bad_data_fields_are_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(DataConfig, fields)


def test_an_evaluation_set_must_be_fixed():
    once, dynamic = DataConfig(binarize="once"), DataConfig(binarize="dynamic", binarize_seed=1)
    TrainConfig(data=dynamic, eval_data=once)
    TrainConfig(data=once)
    with pytest.raises(ConfigError, match="eval_data.binarize 'dynamic'.*an evaluation set must be fixed: use binarize "
                                          "'once'"):
        TrainConfig(data=once, eval_data=dynamic)
    with pytest.raises(ConfigError, match="data.binarize 'dynamic' without eval_data"):
        TrainConfig(data=dynamic)


# ---- binarization -----------------------------------------------------------------------------------------------


LEVELS = (0, 1, 32, 85, 128, 200, 254, 255)


def level_images(per_level: int = 16, side: int = 32) -> np.ndarray:
    """`per_level` constant images of each grey level in LEVELS, the levels interleaved."""
    return np.stack([np.full((side, side), LEVELS[i % len(LEVELS)], dtype=np.uint8)
                     for i in range(per_level * len(LEVELS))])


def assert_bernoulli(grey: np.ndarray, binary: np.ndarray) -> None:
    """Binary pixels (0 or 255) drawn as Bernoulli(grey / 255): per grey level, the fraction of ones is within 5
    standard deviations sqrt(p (1 - p) / n) of p (exact for levels 0 and 255); a correct draw fails this with
    probability below 1e-5 in all. And per image of level 128 (1,024 pixels) the fraction is within 5 standard
    deviations of 1/2, which a draw shared by an image's pixels would miss."""
    assert set(np.unique(binary)) <= {0, 255}
    ones = binary == 255
    for level in np.unique(grey):
        p, chosen = level / 255, grey == level
        n = int(chosen.sum())
        assert abs(ones[chosen].mean() - p) <= 5 * math.sqrt(p * (1 - p) / n), (level, ones[chosen].mean(), p)
    halves = [ones[i].mean() for i in range(len(grey)) if (grey[i] == 128).all()]
    assert halves and all(abs(f - 128 / 255) <= 5 * math.sqrt(0.25 / grey[0].size) for f in halves), halves


def test_once_draws_each_pixel_as_bernoulli_of_its_grey_level(tmp_path):
    grey = level_images()
    path = str(write_idx(tmp_path / "levels.idx", grey))
    binary, _ = items(dataset(DataConfig(source="idx", path=path, binarize="once", binarize_seed=4)))
    assert_bernoulli(grey, binary)
    assert not np.array_equal(binary[4], binary[4 + len(LEVELS)])  # two images of level 128: their own draws


def test_once_is_the_same_at_every_read_and_whatever_the_offset(tmp_path):
    images = grey_images(count=20)[0]
    path = str(write_idx(tmp_path / "i.idx", images))

    def binarized(offset=0, seed=7, limit=None):
        return items(dataset(DataConfig(source="idx", path=path, offset=offset, limit=limit, binarize="once",
                                        binarize_seed=seed)))[0]

    whole = binarized()
    assert np.array_equal(whole, binarized()) and np.array_equal(whole, binarized())
    assert np.array_equal(binarized(offset=6, limit=5), whole[6:11])  # keyed by the index in the source
    assert not np.array_equal(binarized(seed=8), whole)
    assert not np.array_equal(whole[:10], whole[10:])


def test_binary_images_are_left_as_they_are(tmp_path):
    images = (grey_images()[0] > 127).astype(np.uint8) * 255
    path = str(write_idx(tmp_path / "b.idx", images))
    assert np.array_equal(items(dataset(DataConfig(source="idx", path=path, binarize="once")))[0], images)
    assert torch.equal(dynamic_binarize(torch.from_numpy(images)[:, None], 0, 3, range(12))[:, 0],
                       torch.from_numpy(images))


def test_dynamic_binarization_is_keyed_by_seed_step_and_index():
    grey = torch.from_numpy(level_images(per_level=4))[:, None]
    indices = list(range(100, 100 + len(grey)))
    first = dynamic_binarize(grey, 0, 5, indices)
    assert first.dtype == torch.uint8 and first.shape == grey.shape
    assert_bernoulli(grey.numpy(), first.numpy())
    assert torch.equal(dynamic_binarize(grey, 0, 5, indices), first)
    assert torch.equal(dynamic_binarize(grey[7:9], 0, 5, indices[7:9]), first[7:9])  # whatever the batch
    assert not torch.equal(dynamic_binarize(grey, 0, 6, indices), first)  # a new step: new draws
    assert not torch.equal(dynamic_binarize(grey, 1, 5, indices), first)
    assert not torch.equal(dynamic_binarize(grey, 0, 5, [i + 1 for i in indices]), first)
    # the key: Python's hash of the integer tuple, cut to 63 bits, a generator per image
    seeds = [hash((BINARIZE_STREAM, 0, 5, i)) & ((1 << 63) - 1) for i in indices]
    assert [keyed_seed(BINARIZE_STREAM, 0, 5, i) for i in indices] == seeds
    for b in (0, 4, 31):
        uniform = torch.rand(grey[b].shape, generator=torch.Generator().manual_seed(seeds[b]))
        assert torch.equal(first[b], (uniform < grey[b] / 255).to(torch.uint8) * 255)


def test_keyed_seeds_are_the_same_in_every_process():
    """No hash randomisation for integer tuples: another process with another PYTHONHASHSEED keys alike (DataLoader
    workers, resumed runs)."""
    code = "from vqtok.seeds import keyed_seed; print(keyed_seed(3, 2**40, 7), keyed_seed(0, 0))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(keyed_seed(3, 2**40, 7)), str(keyed_seed(0, 0))]


def test_binarize_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError, match=r"binarize takes uint8 images \[B, C, H, W\], got torch.float32"):
        binarize(torch.zeros(2, 1, 4, 4), [0, 1])
    with pytest.raises(ValueError, match=r"uint8 images \[B, C, H, W\], got torch.uint8 \[4, 4\]"):
        binarize(torch.zeros(4, 4, dtype=torch.uint8), [0])
    with pytest.raises(ValueError, match="binarize: 1 seeds for 2 images"):
        binarize(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), [0])


# ---- the token store: what identifies its inputs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "vq", VQConfig(codebook_size=16, dim=4, kmeans_init=False))


def encode(tokenizer: Path, data, out: Path) -> dict:
    encode_dataset(str(tokenizer), data, out, shard_size=2, batch_size=2, num_workers=0, progress=False)
    return json.loads((out / "manifest.json").read_text())


def test_a_store_of_a_window_hashes_the_windows_images_and_records_offset_and_binarization(tokenizer, tmp_path):
    """The store of images 2..4 of a file identifies its inputs as a file of those images alone would; its
    arguments record the offset and the binarization; a 'once' store holds the codes of the binarized images."""
    images, labels = grey_images(count=6, side=16)
    for name in ("whole", "cut"):
        (tmp_path / name).mkdir()
    whole = write_array_source("idx", tmp_path / "whole", images, labels)
    cut = write_array_source("idx", tmp_path / "cut", images[2:5], labels[2:5])
    window = DataConfig(**{**whole.__dict__, "offset": 2, "limit": 3})
    manifest = encode(tokenizer, window, tmp_path / "window")
    assert manifest["inputs"] == input_identity(dataset(cut), [(0, 2), (2, 1)])[0]
    assert manifest["args"]["data"]["offset"] == 2 and manifest["args"]["data"]["binarize"] == "none"
    with pytest.raises(TokenStoreError, match=r"different arguments \(data\)"):
        encode(tokenizer, DataConfig(**{**window.__dict__, "offset": 3}), tmp_path / "window")

    once = DataConfig(**{**window.__dict__, "binarize": "once", "binarize_seed": 2})
    assert encode(tokenizer, once, tmp_path / "once")["args"]["data"]["binarize_seed"] == 2
    binarized = torch.stack([dataset(once)[i][0] for i in range(3)])
    assert set(binarized.unique().tolist()) == {0, 255}
    model = vqtok.load(tokenizer)
    expected = model.encode(uint8_to_range(binarized, model.config.value_range))
    assert torch.equal(torch.stack([TokenDataset(tmp_path / "once")[i][0] for i in range(3)]).long(), expected)
    with pytest.raises(TokenStoreError, match="a store encodes a fixed set: use binarize 'once'"):
        encode(tokenizer, DataConfig(**{**window.__dict__, "binarize": "dynamic"}), tmp_path / "dynamic")
    assert not (tmp_path / "dynamic").exists()


# ---- images of any size: resized and centre-cropped to the model's resolution by default ---------------------------


def write_photos(folder: Path) -> dict[str, Path]:
    """Real image files of awkward sizes (width x height): a 65x74 JPEG and a 64x48 PNG, RGB, smooth like photos."""
    from PIL import ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = {}
    for name, (width, height) in {"tall.jpg": (65, 74), "wide.png": (64, 48)}.items():
        noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        paths[name] = folder / name
        noise.filter(ImageFilter.GaussianBlur(2)).save(paths[name])
    return paths


def pil_resize_and_crop(image: Image.Image, size: int) -> np.ndarray:
    """The reference: PIL's bicubic resize (antialiased when shrinking) of the shorter side to `size` (the longer one
    truncated, as torchvision does), then the centre size x size by hand, torchvision's rounding of the offsets."""
    width, height = image.size
    new = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    resized = np.asarray(image.convert("RGB").resize(new, Image.BICUBIC))
    top, left = round((new[1] - size) / 2), round((new[0] - size) / 2)
    return resized[top : top + size, left : left + size]


def test_a_new_model_resizes_and_crops_to_its_resolution_and_config_json_records_it(tmp_path):
    from tests.conftest import tiny_config
    from vqtok.config import AutoencoderConfig
    from vqtok.models import HierarchicalVAEConfig

    config = tiny_config(VQConfig(codebook_size=16, dim=4))  # no preprocess given
    assert config.preprocess == PreprocessConfig(resize=16, crop=16)
    assert HierarchicalVAEConfig(resolution=8, scales=(4, 2)).preprocess == PreprocessConfig(resize=8, crop=8)
    partial = from_dict(AutoencoderConfig, {"resolution": 16, "channel_mult": [1, 2], "preprocess": {"resize": 20}})
    assert partial.preprocess == PreprocessConfig(resize=20, crop=16)  # the crop left out: the resolution
    vqtok.Autoencoder(config).save_pretrained(tmp_path / "tok")
    saved = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert saved["preprocess"] == {"resize": 16, "crop": 16}  # the numbers, whatever later defaults


def test_old_config_json_files_keep_their_preprocessing(tmp_path):
    """A config.json of older vqtok records its preprocessing (null for a step it did not do): loaded, it does
    exactly that, where a new one would resize and crop. Without a crop, the sides are trimmed to multiples of the
    downsampling factor (here 2), so that what preprocess gives is always a size encode takes."""
    from tests.conftest import tiny_config

    vqtok.Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4))).save_pretrained(tmp_path / "tok")
    images = torch.randint(0, 256, (1, 3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for preprocess, shape in [({"resize": None, "crop": None}, (48, 64)), ({"resize": 16, "crop": None}, (16, 20))]:
        config = json.loads((tmp_path / "tok" / "config.json").read_text())
        (tmp_path / "tok" / "config.json").write_text(json.dumps({**config, "preprocess": preprocess}))
        tok = vqtok.load(tmp_path / "tok")
        assert tok.config.preprocess == PreprocessConfig(**preprocess)
        x = tok.preprocess(images)
        assert x.shape[-2:] == shape and tok.encode(x).shape == (1, shape[0] // 2, shape[1] // 2)
        if preprocess["resize"] is None:  # as it was: the image itself
            assert torch.equal(tok.postprocess(x), images)
        else:  # resized to 16x21 as it was, then its 20 central columns (torchvision's centre: offset round(0.5) = 0)
            resized = resize_and_crop(images, 16, None)
            assert resized.shape[-2:] == (16, 21) and torch.equal(tok.postprocess(x), resized[..., :, 0:20])
    photo = write_photos(tmp_path / "photos")["wide.png"]  # 64x48: a store holds the codes of what preprocess gives
    (tmp_path / "photos" / "tall.jpg").unlink()
    store = TokenDataset(encode_dataset(tok, DataConfig(source="folder", path=str(tmp_path / "photos")),
                                        tmp_path / "store", num_workers=0, progress=False))
    with Image.open(photo) as image:
        assert store.grid == (8, 10) and torch.equal(store[0][0], tok.encode(tok.preprocess(image))[0])


def test_real_jpeg_and_png_files_are_resized_and_centre_cropped_as_pil_does(tmp_path):
    """The issue's images: a 65x74 JPEG and a 64x48 PNG become the 16x16 a default model trains at, within one grey
    level of PIL's own resize and a centre crop by hand; the dataset a training run reads gives the same pixels as
    `preprocess`, and encode takes them."""
    from tests.conftest import tiny_config

    paths = write_photos(tmp_path / "photos")
    tok = vqtok.Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4))).eval()
    data = build_dataset(DataConfig(source="folder", path=str(tmp_path / "photos")), channels=3,
                         preprocess=tok.config.preprocess, size=tok.config.resolution)  # what training reads
    for i, path in enumerate(sorted(paths.values())):
        with Image.open(path) as image:
            x = tok.preprocess(image)
            reference = pil_resize_and_crop(image, 16)
        got = tok.postprocess(x)[0].permute(1, 2, 0).numpy()
        assert got.shape == (16, 16, 3) and np.abs(got.astype(int) - reference).max() <= 1, path
        assert torch.equal(data[i][0], tok.postprocess(x)[0])
        assert tok.encode(x).shape == (1, 8, 8)


@pytest.mark.parametrize("model, preprocess, message", [
    ("vq", {"crop": 15}, r"preprocess.crop \(15\) makes every image 15x15, which encode refuses: sides must be "
                         r"multiples of the downsampling factor 2"),
    ("vq", {"resize": 17, "crop": None}, r"preprocess.resize \(17\) makes every image's shorter side 17 "
                                         r"\(preprocess.crop is null\), which encode refuses"),
    ("vq", {"resize": 12}, r"preprocess.resize \(12\) is below the model's resolution 16, which preprocess.crop "
                           r"\(not given\) defaults to: set crop to at most 12, or null for no crop"),
    ("vq", {"resize": 12, "crop": 14}, r"preprocess.crop \(14\) must not exceed resize \(12\)"),
    ("hvae", {"crop": 4}, r"preprocess.crop \(4\) makes every image 4x4, but this model takes images of its "
                          r"resolution 8 only"),
    ("hvae", {"resize": 16, "crop": None}, r"preprocess.resize \(16\) makes every image's shorter side 16"),
])
def test_preprocessing_that_gives_sizes_encode_refuses_is_a_config_error(model, preprocess, message):
    from vqtok.config import AutoencoderConfig
    from vqtok.models import HierarchicalVAEConfig

    cls, base = ((AutoencoderConfig, {"resolution": 16, "channel_mult": [1, 2]}) if model == "vq"
                 else (HierarchicalVAEConfig, {"resolution": 8, "scales": [4, 2]}))
    with pytest.raises(ConfigError, match=f"c.json: {message}"):
        from_dict(cls, {**base, "preprocess": preprocess}, source="c.json")
    kind = {"kind": "hierarchical_vae"} if model == "hvae" else {}
    train = {"model": {**base, **kind, "preprocess": preprocess}, "loss": "bernoulli" if kind else "mse"}
    with pytest.raises(ConfigError, match=f"c.yaml: model.{message}"):  # as a training config names it
        from_dict(TrainConfig, train, source="c.yaml")


def test_a_model_of_one_size_refuses_in_preprocess_what_it_cannot_encode():
    """A hierarchical VAE takes its resolution only: an old-style config without a crop gets a non-square image to
    16x21, and preprocess says so (naming its config) rather than handing encode a size it refuses."""
    from vqtok.models import HierarchicalVAE, HierarchicalVAEConfig

    model = HierarchicalVAE(HierarchicalVAEConfig(
        in_channels=1, resolution=16, scales=(4, 2), groups_per_scale=(1, 1), latent_channels=2, width=8,
        encoder_cells=1, cells_per_group=1, preprocess=PreprocessConfig(resize=16, crop=None)))
    assert model.preprocess(torch.zeros(1, 1, 40, 40, dtype=torch.uint8)).shape == (1, 1, 16, 16)  # square: fine
    with pytest.raises(ValueError, match=r"preprocess \(config.preprocess: resize 16, crop None\) cannot make 48x64 "
                                         r"images into a size this model encodes: .* 16x16, got 16x21"):
        model.preprocess(torch.zeros(1, 1, 48, 64, dtype=torch.uint8))


def test_a_converted_checkpoint_neither_resizes_nor_crops():
    """Another library's VAE (diffusers' AutoencoderKL with its defaults: sample_size 32) encodes images of any size:
    its converted config records no resize and no crop, whatever the new default for vqtok's own models."""
    from vqtok.pretrained.configs import diffusers_config

    config = diffusers_config({"_class_name": "AutoencoderKL"}, where="config.json")
    assert config.resolution == 32 and config.preprocess == PreprocessConfig(resize=None, crop=None)
    images = torch.randint(0, 256, (1, 3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tok = vqtok.Autoencoder(config)
    assert torch.equal(tok.postprocess(tok.preprocess(images)), images)
