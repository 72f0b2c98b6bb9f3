"""preprocess/postprocess between uint8/PIL images and the model's input range."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import png_header, tiny_config
from vqtok import Autoencoder
from vqtok.config import VQConfig


@pytest.mark.parametrize("input_range", ["-1,1", "0,1"])
def test_uint8_roundtrip_is_exact(input_range):
    model = Autoencoder(tiny_config(VQConfig(codebook_size=8, dim=4), input_range=input_range))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    x = model.preprocess(images)
    lo, hi = model.config.value_range
    assert x.dtype == torch.float32 and x.min() >= lo and x.max() <= hi
    assert torch.equal(model.postprocess(x), images)


def test_pil_and_numpy_inputs(vq_model):
    array = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    from_pil = vq_model.preprocess([Image.fromarray(array), Image.fromarray(array)])
    from_numpy = vq_model.preprocess(array)
    assert from_pil.shape == (2, 3, 16, 16)
    assert torch.equal(from_pil[0], from_numpy[0])
    pil = vq_model.postprocess(from_numpy, output_type="pil")
    assert np.array_equal(np.asarray(pil[0]), array)


def test_grey_pil_is_converted_for_rgb_models(vq_model):
    grey = Image.fromarray(np.full((16, 16), 128, dtype=np.uint8), mode="L")
    assert vq_model.preprocess(grey).shape == (1, 3, 16, 16)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.zeros(1, 1, 16, 16, dtype=torch.uint8), ValueError, "1 channels, the model takes 3"),
        (torch.zeros(1, 3, 16, 16), TypeError, "must be uint8"),
        (np.zeros((16, 16, 3), dtype=np.float32), TypeError, "must be uint8"),
        ([], ValueError, "no images"),
        ("image.png", TypeError, "cannot read images"),
    ],
)
def test_bad_inputs_are_clear_errors(vq_model, bad, error, match):
    with pytest.raises(error, match=match):
        vq_model.preprocess(bad)


def test_16_bit_images_are_scaled_not_clipped(vq_model):
    values = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 0 .. 65535 in steps of 257
    image = Image.fromarray(values)  # mode I;16
    x = vq_model.postprocess(vq_model.preprocess(image))
    assert torch.equal(x[0, 0], torch.from_numpy((values >> 8).astype(np.uint8)))
    with pytest.raises(ValueError, match="mode F"):
        vq_model.preprocess(Image.fromarray(np.zeros((16, 16), dtype=np.float32)))


# ---- image folders: files that cannot be read -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["bomb", "broken_link"])
def test_a_bomb_or_a_broken_link_is_an_unreadable_image(tmp_path, bad):
    """Counted with skip_unreadable, an error naming the file without: never left out unseen or a raw PIL error."""
    from vqtok.config import DataConfig, PreprocessConfig
    from vqtok.data import build_dataset
    from vqtok.data.sources import UnreadableImageError

    for name in ("a.png", "c.png"):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / name)
    if bad == "bomb":
        png_header(tmp_path / "b.png", 20_000, 20_000)
        reason = "decompression bomb"
    else:
        (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
        reason = f"a broken symbolic link \\(to {tmp_path / 'gone.png'}\\)"

    def build(skip: bool):
        config = DataConfig(source="folder", path=str(tmp_path), skip_unreadable=skip)
        return build_dataset(config, channels=1, preprocess=PreprocessConfig(resize=None, crop=None), size=None)

    skipping = build(True)
    assert skipping.skipped == 1 and [p.name for p in skipping.source.files] == ["a.png", "c.png"]
    strict = build(False)
    assert len(strict) == 3
    with pytest.raises(UnreadableImageError, match=f"cannot read image {tmp_path / 'b.png'}: .*{reason}"):
        strict[1]
