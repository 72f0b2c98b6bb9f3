"""Interpolation and latent arithmetic (vqtok.latents): exact endpoints, slerp against hand cases and a float64
formula, VQ steps that are real code grids, attribute vectors and analogies exact on a linear test double, and the
`vqtok interpolate` / `vqtok arithmetic` commands end to end on tiny saved models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import vqtok
from tests.conftest import tiny_config
from tests.test_cli import fails
from vqtok.cli import main
from vqtok.config import GaussianConfig, PreprocessConfig, VQConfig
from vqtok.latents import (
    GaussianLatents,
    HierarchicalLatents,
    LatentSpace,
    VQFeatures,
    analogy,
    apply_attribute,
    attribute_vector,
    class_means,
    default_method,
    interpolate,
    interpolate_latents,
    latent_space,
    lerp,
    slerp,
)


class Identity:
    """A linear "tokenizer": the latent of an image is the image itself (one group), and decoding gives it back."""

    value_range = (0.0, 1.0)

    def encode(self, x, labels=None):
        return [x.clone()]

    def decode(self, latents, labels=None):
        return latents[0].clone()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "gaussian": vqtok.Autoencoder(tiny_config(GaussianConfig(dim=4))).eval(),
        "vq": vqtok.Autoencoder(tiny_config(VQConfig(codebook_size=32, dim=4, kmeans_init=False))).eval(),
        "hierarchical": vqtok.HierarchicalVAE(vqtok.HierarchicalVAEConfig(
            in_channels=3, resolution=8, scales=(4, 2), groups_per_scale=(1, 1), latent_channels=2, width=8,
            encoder_cells=1, cells_per_group=1)).eval(),
    }


def pair(kind: str, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of images in the model's range: [-1, 1] RGB 16x16 for the autoencoders, [0, 1] 8x8 for the HVAE."""
    g = torch.Generator().manual_seed(1)
    if kind == "hierarchical":
        return torch.rand(batch, 3, 8, 8, generator=g), torch.rand(batch, 3, 8, 8, generator=g)
    return torch.rand(batch, 3, 16, 16, generator=g) * 2 - 1, torch.rand(batch, 3, 16, 16, generator=g) * 2 - 1


def own_latents(model, x: torch.Tensor) -> list[torch.Tensor]:
    """The latents as the model's own API gives them (not through vqtok.latents)."""
    if isinstance(model, vqtok.HierarchicalVAE):
        return [q.mean for q in model.encode(x)]
    if model.is_gaussian:
        return [model.encode(x).mean]
    return [model.encode(x, return_dict=True).latents]


# ---- lerp and slerp ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", [lerp, slerp])
def test_both_paths_give_the_endpoints_exactly(path, dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 5, 5, generator=g, dtype=dtype), torch.randn(3, 4, 5, 5, generator=g, dtype=dtype)
    assert torch.equal(path(a, b, 0.0), a) and torch.equal(path(a, b, 1.0), b)
    assert not torch.equal(path(a, b, 0.5), a) and not torch.equal(path(a, b, 0.5), b)


def test_slerp_of_orthogonal_unit_vectors():
    a, b = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(slerp(a, b, 0.5), (a + b) / math.sqrt(2), rtol=0, atol=1e-7)
    # a quarter of the way along the quarter circle: the angle pi/8 from a
    torch.testing.assert_close(slerp(a, b, 0.25), torch.tensor([[math.cos(math.pi / 8), math.sin(math.pi / 8), 0.0]]),
                               rtol=0, atol=1e-7)


def test_slerp_keeps_the_norm_on_the_great_circle_and_matches_the_float64_formula():
    """Each image's latent is one vector: rows of equal norm r stay at norm r at every t, and the result is the
    textbook formula, computed here in numpy float64 with arccos."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, 3, generator=g,
                                                                                  dtype=torch.float64)
    r = torch.tensor([0.5, 1.0, 3.0, 10.0], dtype=torch.float64)[:, None, None, None]
    a, b = a / a.flatten(1).norm(dim=1)[:, None, None, None] * r, b / b.flatten(1).norm(dim=1)[:, None, None, None] * r
    u, v = a.flatten(1).numpy(), b.flatten(1).numpy()
    theta = np.arccos(np.sum(u * v, axis=1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)))[:, None]
    for t in np.linspace(0, 1, 11):
        z = slerp(a, b, float(t))
        np.testing.assert_allclose(z.flatten(1).norm(dim=1).numpy(), r.flatten().numpy(), rtol=1e-12)
        expected = (np.sin((1 - t) * theta) * u + np.sin(t * theta) * v) / np.sin(theta)
        np.testing.assert_allclose(z.flatten(1).numpy(), expected, rtol=0, atol=1e-12)
    # float32 in, float32 out, on the same circle
    z32 = slerp(a.float(), b.float(), 0.3)
    assert z32.dtype == torch.float32
    np.testing.assert_allclose(z32.flatten(1).norm(dim=1).numpy(), r.flatten().numpy(), rtol=1e-6)


def test_slerp_falls_back_to_the_line_where_the_great_circle_is_undefined():
    b = torch.tensor([[1.0, 2.0, 2.0], [1.0, 2.0, 2.0], [1.0, 2.0, 2.0]])
    a = torch.stack([2 * b[0], -b[1], torch.zeros(3)])  # parallel, opposite, zero
    torch.testing.assert_close(slerp(a, b, 0.25), 0.75 * a + 0.25 * b)
    assert torch.isfinite(slerp(a, b, 0.5)).all()


# ---- interpolation through models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "vq", "hierarchical"])
@pytest.mark.parametrize("method", ["slerp", "linear"])
def test_the_path_starts_and_ends_at_the_inputs_latents_exactly(models, kind, method):
    model = models[kind]
    a, b = pair(kind)
    space = latent_space(model)
    za, zb = space.encode(a), space.encode(b)
    for own, mine in zip(own_latents(model, a), za):
        assert torch.equal(own, mine)
    path = interpolate_latents(za, zb, 6, method)
    assert len(path) == 6 and all(len(step) == len(za) for step in path)
    assert all(torch.equal(p, q) for p, q in zip(path[0], za)) and all(torch.equal(p, q) for p, q in zip(path[-1], zb))
    images = interpolate(model, a, b, 6, method=method)
    assert images.shape == (2, 6, *a.shape[1:])
    torch.testing.assert_close(images[:, 0], space.decode(za), rtol=0, atol=1e-6)  # the reconstructions at both ends
    torch.testing.assert_close(images[:, -1], space.decode(zb), rtol=0, atol=1e-6)


def test_the_latents_and_default_paths_of_each_model(models):
    assert isinstance(latent_space(models["gaussian"]), GaussianLatents)
    assert isinstance(latent_space(models["vq"]), VQFeatures)
    assert isinstance(latent_space(models["hierarchical"]), HierarchicalLatents)
    assert [default_method(models[k]) for k in ("gaussian", "vq", "hierarchical")] == ["slerp", "linear", "slerp"]
    double = Identity()
    assert isinstance(double, LatentSpace) and latent_space(double) is double and default_method(double) == "slerp"
    with pytest.raises(TypeError, match="no latent space for a str"):
        latent_space("a model")
    with pytest.raises(ValueError, match="not class-conditional"):
        latent_space(models["gaussian"]).encode(pair("gaussian")[0], labels=3)
    with pytest.raises(ValueError, match="not class-conditional"):
        interpolate(models["hierarchical"], *pair("hierarchical"), 3, labels=0)


def test_k_steps_give_k_images_for_each_pair_of_a_batch():
    """On the identity double the images are the latents: linear steps are the hand-computed points."""
    a, b = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2) * torch.tensor([1.0, 2.0, 4.0])[:, None, None, None]
    images = interpolate(Identity(), a, b, 5, method="linear")
    assert images.shape == (3, 5, 1, 2, 2)
    for j, t in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):
        assert torch.equal(images[:, j], t * b)
    with pytest.raises(ValueError, match="at least 2"):
        interpolate(Identity(), a, b, 1)
    with pytest.raises(ValueError, match="method must be one of slerp, linear"):
        interpolate(Identity(), a, b, 3, method="cubic")


def test_every_vq_step_is_the_image_of_the_codes_of_the_interpolated_features(models):
    """Each step decodes the nearest codes (found here by brute force in float64) of the linearly interpolated
    encoder features: every point of a VQ strip is a real code grid."""
    model = models["vq"]
    a, b = pair("vq")
    fa, fb = own_latents(model, a)[0], own_latents(model, b)[0]
    images = interpolate(model, a, b, 7)  # linear by default
    codebook = model.bottleneck.code_vectors().double()
    grids = set()
    for j, t in enumerate(np.linspace(0, 1, 7)):
        features = ((1 - t) * fa.double() + t * fb.double()).permute(0, 2, 3, 1)  # [B, h, w, dim]
        codes = torch.cdist(features.reshape(-1, 4), codebook).argmin(dim=1).view(features.shape[:3])
        torch.testing.assert_close(images[:, j], model.decode(codes), rtol=0, atol=1e-6)
        grids.add(tuple(codes.flatten().tolist()))
    assert len(grids) > 2  # the path moves through codes


# ---- latent arithmetic on the linear double ----------------------------------------------------------------------------


def labelled_images() -> list[tuple[torch.Tensor, int]]:
    """12 uint8 images [1, 2, 2] with labels 0, 1, 2 (4 each), as a vqtok dataset gives them."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 2, 2), generator=g, dtype=torch.uint8)
    return [(images[i], i % 3) for i in range(12)]


def hand_mean(items, label: int, limit: int | None = None) -> np.ndarray:
    chosen = [image.numpy().astype(np.float32) / np.float32(255) for image, lab in items if lab == label][:limit]
    return np.sum(np.stack(chosen).astype(np.float64), axis=0) / len(chosen)


@pytest.mark.parametrize("limit", [None, 3])
def test_the_attribute_vector_is_the_difference_of_the_class_means(limit):
    items = labelled_images()
    means = class_means(Identity(), items, [2, 0], limit=limit, batch_size=5, progress=False)
    assert means.counts == {2: limit or 4, 0: limit or 4}
    for c in (0, 2):
        assert np.array_equal(means.means[c][0].numpy(), hand_mean(items, c, limit))
    vector = attribute_vector(means, from_class=0, to_class=2)
    assert len(vector) == 1 and vector[0].dtype == torch.float64
    assert np.array_equal(vector[0].numpy(), hand_mean(items, 2, limit) - hand_mean(items, 0, limit))


def test_applying_an_attribute_vector_is_exact():
    items = labelled_images()
    vector = attribute_vector(class_means(Identity(), items, [0, 1], progress=False), 0, 1)
    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    strengths = [-1.0, 0.0, 0.5, 2.0]
    out = apply_attribute(Identity(), x, vector, strengths)
    assert out.shape == (3, 4, 1, 2, 2)
    for j, s in enumerate(strengths):
        assert torch.equal(out[:, j], (x.double() + s * vector[0]).float())
    assert torch.equal(out[:, 1], x)
    with pytest.raises(ValueError, match="give images of the size the class means were computed at"):
        apply_attribute(Identity(), torch.rand(1, 1, 4, 4), vector, strengths)


def test_an_analogy_is_exact():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 8, (2, 1, 3, 3), generator=g).float() / 8 for _ in range(3))  # dyadic: exact sums
    assert torch.equal(analogy(Identity(), a, b, c), a - b + c)
    model = vqtok.Autoencoder(tiny_config(GaussianConfig(dim=4))).eval()  # and through a model: decode(z_a - z_b + z_c)
    x, y = pair("gaussian")
    z = [model.encode(im).mean.double() for im in (y, x, x)]
    torch.testing.assert_close(analogy(model, y, x, x), model.decode((z[0] - z[1] + z[2]).float()), rtol=0, atol=1e-6)


def test_only_the_chosen_images_are_read_and_bad_classes_are_named():
    class Counted(list):
        def __init__(self, items):
            super().__init__(items)
            self.labels, self.read = [lab for _, lab in items], []

        def __getitem__(self, i):
            self.read.append(i)
            return super().__getitem__(i)

    data = Counted(labelled_images())
    class_means(Identity(), data, [1], limit=2, progress=False)
    assert sorted(data.read) == [1, 4]
    with pytest.raises(ValueError, match=r"class 7: no image of the data has this label \(its labels: 0, 1, 2\)"):
        class_means(Identity(), data, [0, 7], progress=False)
    with pytest.raises(ValueError, match="the data has no labels"):
        class_means(Identity(), [(image, -1) for image, _ in labelled_images()], [0], progress=False)
    means = class_means(Identity(), data, [0, 1], progress=False)
    with pytest.raises(ValueError, match="class 2: no mean computed"):
        attribute_vector(means, 0, 2)
    with pytest.raises(ValueError, match="same class"):
        attribute_vector(means, 1, 1)


# ---- the command line ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny grey Gaussian tokenizer (16x16 images, resized and cropped), a VQ one that neither resizes nor crops,
    and two images of different sizes."""
    root = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    vqtok.Autoencoder(tiny_config(GaussianConfig(dim=3), in_channels=1)).save_pretrained(root / "vae")
    vqtok.Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4, kmeans_init=False), in_channels=1,
                                  preprocess=PreprocessConfig(resize=None, crop=None))).save_pretrained(root / "vq")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "b.png")
    return root


def tile(png, row: int, column: int, side: int = 64) -> np.ndarray:
    """Tile (row, column) of a save_image_grid PNG (2-pixel padding), shrunk back from its enlargement to 16x16."""
    grid = np.array(Image.open(png).convert("L"))
    y, x = 2 + row * (side + 2), 2 + column * (side + 2)
    return grid[y : y + side : side // 16, x : x + side : side // 16]


def test_interpolate_writes_a_strip_with_the_inputs_at_both_ends(saved, tmp_path, capsys):
    out = tmp_path / "strip.png"
    assert main(["interpolate", str(saved / "vae"), str(saved / "a.png"), str(saved / "b.png"), "--steps", "5",
                 "--out", str(out)]) == 0
    assert "input A, 5 slerp steps, input B" in capsys.readouterr().out
    assert Image.open(out).size == (7 * 66 + 2, 68)  # 16x16 tiles enlarged to 64x64, 2-pixel padding
    model = vqtok.load(saved / "vae")
    a, b = (model.postprocess(model.preprocess(Image.open(saved / name)))[0, 0].numpy() for name in ("a.png", "b.png"))
    assert np.array_equal(tile(out, 0, 0), a) and np.array_equal(tile(out, 0, 6), b)
    assert not np.array_equal(tile(out, 0, 1), a)  # (the tiles are where they are said to be)
    # an existing --out is refused and left as it was
    before = out.read_bytes()
    fails(capsys, ["interpolate", saved / "vae", saved / "a.png", saved / "b.png", "--out", out], "interpolate",
          f"--out {out}: exists")
    assert out.read_bytes() == before


def test_interpolate_refuses_what_it_cannot_use(saved, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((1, 3), dtype=np.uint8)).save(small)
    out = tmp_path / "s.png"
    vae, vq, a, b = saved / "vae", saved / "vq", saved / "a.png", saved / "b.png"
    fails(capsys, ["interpolate", vae, a, bad, "--out", out], "interpolate", f"cannot read image {bad}")
    fails(capsys, ["interpolate", vae, a, tmp_path / "none.png", "--out", out], "interpolate", "cannot read image",
          "none.png")
    fails(capsys, ["interpolate", vq, b, small, "--out", out], "interpolate", f"{small}: preprocess", "smaller than 2")
    fails(capsys, ["interpolate", vq, a, b, "--out", out], "interpolate", "differ in size after preprocessing",
          f"{a} is 20x24")
    fails(capsys, ["interpolate", vae, a, b, "--label", "2", "--out", out], "interpolate", "--label 2",
          "not a class-conditional model")
    fails(capsys, ["interpolate", vae, a, b, "--steps", "1", "--out", out], "interpolate", "--steps 1: at least 2")
    assert not out.exists()


def test_arithmetic_writes_a_grid_of_images_by_strengths(saved, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["arithmetic", str(saved / "vae"), "--data", "digits", "--from-class", "1", "--to-class", "7",
                 "--limit", "10", "--apply-data", "digits", "--apply-limit", "3", "--strengths", "-1,0,1,2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "class 7 (10 images) - class 1's (10 images)" in text and "3 rows (input, then strengths -1, 0, 1, 2)" in text
    assert Image.open(out).size == (5 * 66 + 2, 3 * 66 + 2)
    fails(capsys, ["arithmetic", saved / "vae", "--data", "digits", "--from-class", "1", "--to-class", "7",
                   "--images", saved / "a.png", "--out", out], "arithmetic", "exists")
    grid = tmp_path / "files.png"
    assert main(["arithmetic", str(saved / "vae"), "--data", "digits", "--from-class", "3", "--to-class", "8",
                 "--images", str(saved / "a.png"), str(saved / "b.png"), "--strengths=0.5", "--out", str(grid)]) == 0
    assert Image.open(grid).size == (2 * 66 + 2, 2 * 66 + 2)


def test_arithmetic_names_missing_classes_missing_labels_and_contradictions(saved, tmp_path, capsys):
    out, vae, a = tmp_path / "g.png", saved / "vae", saved / "a.png"
    common = ["arithmetic", vae, "--data", "digits", "--out", out]
    fails(capsys, [*common, "--from-class", "1", "--to-class", "12", "--images", a], "arithmetic",
          "class 12: no image of the data has this label", "0, 1, 2", only_line=False)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(unlabelled / "x.png")
    fails(capsys, ["arithmetic", vae, "--data", unlabelled, "--from-class", "0", "--to-class", "1", "--images", a,
                   "--out", out], "arithmetic", "the data has no labels")
    fails(capsys, [*common, "--from-class", "1", "--to-class", "1", "--images", a], "arithmetic", "both 1")
    fails(capsys, [*common, "--from-class", "1", "--to-class", "2", "--images", a, "--apply-limit", "3"], "arithmetic",
          "--apply-limit counts the images of --apply-data")
    fails(capsys, [*common, "--from-class", "1", "--to-class", "2", "--images", tmp_path / "none.png"], "arithmetic",
          "cannot read image")
    assert not out.exists()
    assert main([str(x) for x in [*common, "--from-class", "1", "--to-class", "2", "--images", a, "--apply-data",
                                  "digits"]]) == 2  # one source of images to move
    assert "not allowed with argument" in capsys.readouterr().err
