"""Anomaly scores (vqtok.anomaly, `vqtok score`): the AUROC against scikit-learn, per-image scores against hand
computations and against evaluate's means on the same posterior draws, a prior's bits against its logits, the
refusals, and the command end to end."""

from __future__ import annotations

import csv
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import vqtok
from tests.conftest import tiny_config
from tests.test_cli import fails
from vqtok.anomaly import (
    PALETTE,
    PANEL_SIZE,
    ImageScores,
    auroc,
    auroc_by_kind,
    save_histograms,
    score_images,
    scores_csv,
)
from vqtok.cli import main
from vqtok.config import DataConfig, GaussianConfig, PreprocessConfig, PriorConfig, VQConfig
from vqtok.data import build_dataset
from vqtok.images import uint8_to_range
from vqtok.models import TransformerPrior
from vqtok.models.prior import PriorTokenizerMismatch, code_nll, tokenizer_ref
from vqtok.train.evaluate import evaluate, iwae_bound

SMALL = dict(in_channels=1, base_channels=8, norm_groups=4, attn_resolutions=(), preprocess=PreprocessConfig(resize=16))


def digits(n: int, *, binarize: bool = False, split: str = "train"):
    window = {"binarize": "once", "binarize_seed": 3} if binarize else {}
    return build_dataset(DataConfig(source="digits", split=split, limit=n, **window), channels=1,
                         preprocess=PreprocessConfig(resize=16), size=16)


def stack(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def mixture_vae(seed: int = 0) -> vqtok.Autoencoder:
    """A tiny Gaussian VAE with a discretized logistic likelihood (a discrete one: a negative ELBO in nats)."""
    torch.manual_seed(seed)
    return vqtok.Autoencoder(tiny_config(GaussianConfig(dim=3), decoder_output="logistic_mixture", num_mixtures=2,
                                         **SMALL)).eval()


def vq_tokenizer(seed: int = 0) -> vqtok.Autoencoder:
    torch.manual_seed(seed)
    return vqtok.Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4, kmeans_init=False), **SMALL)).eval()


def prior_of(tokenizer: vqtok.Autoencoder, **overrides) -> TransformerPrior:
    torch.manual_seed(1)
    settings = dict(vocab_size=16, grid=(8, 8), num_classes=3, tokenizer=tokenizer_ref(tokenizer), n_layer=1,
                    n_head=2, n_embd=16)
    settings.update(overrides)
    return TransformerPrior(PriorConfig(**settings)).eval()


# ---- the AUROC ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auroc_is_scikit_learns_roc_auc_score_with_and_without_ties(seed):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 60, size=2)
    normal, anomalous = rng.normal(0, 1, n), rng.normal(0.7, 1.3, m)
    for digits_kept in (None, 0):  # continuous scores, then rounded to integers: many ties within and across sets
        a, b = (normal, anomalous) if digits_kept is None else (normal.round(0), anomalous.round(0))
        expected = roc_auc_score(np.r_[np.zeros(n), np.ones(m)], np.r_[a, b])
        assert abs(auroc(a, b) - expected) < 1e-12, (auroc(a, b), expected)
    assert isinstance(auroc(normal, anomalous), float)


def test_auroc_of_separated_reversed_and_identical_sets():
    assert auroc([1, 2, 3], [4, 5]) == 1.0
    assert auroc([4, 5], [1, 2, 3]) == 0.0
    assert auroc([2, 2, 2], [2, 2]) == 0.5  # every pair a tie: one half each
    assert auroc([1, 3], [2]) == 0.5
    assert auroc([1, 2], [2, 3]) == (3 + 0.5) / 4  # (1,2) (1,3) (2,3) above, (2,2) a tie


@pytest.mark.parametrize("normal, anomalous, fragment", [
    ([], [1.0], "normal scores are empty"),
    ([1.0], np.zeros(0), "anomalous scores are empty"),
    ([1.0, np.nan], [1.0], "1 of the 2 normal scores are NaN or infinite"),
    ([1.0], [np.inf, -np.inf, 2.0], "2 of the 3 anomalous scores"),
])
def test_auroc_refuses_empty_and_non_finite_scores(normal, anomalous, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        auroc(normal, anomalous)


def test_psnr_is_negated_for_the_auroc_and_an_exact_reconstruction_stays_defined():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)

    def make(mse):
        return ImageScores(np.arange(len(mse)), {"mse": mse, "psnr": 10 * np.log10(255.0**2 / mse)})

    normal, anomalous = make(rng.uniform(10, 200, 30)), make(rng.uniform(50, 400, 20))
    expected = roc_auc_score(np.r_[np.zeros(30), np.ones(20)], -np.r_[normal.scores["psnr"], anomalous.scores["psnr"]])
    found = auroc_by_kind(normal, anomalous)
    assert abs(found["psnr"] - expected) < 1e-12 and found["psnr"] == found["mse"] > 0.5
    with np.errstate(divide="ignore"):
        exact = make(np.array([0.0, 5.0]))  # a pixel-exact reconstruction: psnr inf
    assert exact.scores["psnr"][0] == np.inf and auroc_by_kind(exact, anomalous)["psnr"] == 1.0


# ---- per-image scores ----------------------------------------------------------------------------------------------


def test_mse_and_psnr_per_image_by_hand_and_evaluates_psnr_of_one_image():
    model, data = vq_tokenizer(), digits(6)
    scores = score_images(model, data, batch_size=4)
    images = stack(data)
    with torch.no_grad():
        out = model(uint8_to_range(images, model.config.value_range))
        recon = model.postprocess(model.to_image(out.reconstruction))
    diff = recon.numpy().astype(np.float64) - images.numpy().astype(np.float64)
    mse = (diff**2).reshape(6, -1).mean(axis=1)
    np.testing.assert_array_equal(scores.scores["mse"], mse)  # sums of squared integers: exact
    np.testing.assert_allclose(scores.scores["psnr"], 10 * np.log10(255**2 / mse), rtol=1e-14)
    assert scores.scores["mse"].dtype == np.float64 and list(scores.indices) == list(range(6))
    assert list(scores.scores) == ["mse", "psnr"]  # VQ without a prior: no likelihood scores
    assert abs(evaluate(model, data, limit=1)["psnr"] - scores.scores["psnr"][0]) < 1e-9


def test_the_mean_negative_elbo_and_iwae_bound_are_evaluates_on_the_same_draws():
    model, data = mixture_vae(), digits(20)
    scores = score_images(model, data, iwae=3, batch_size=8)
    metrics = evaluate(model, data, iwae=3, batch_size=8)
    assert list(scores.scores) == ["mse", "psnr", "neg_elbo_nats", "iwae_nats"]
    assert abs(scores.scores["neg_elbo_nats"].mean() - metrics["neg_elbo_nats"]) < 1e-6 * metrics["neg_elbo_nats"]
    assert abs(scores.scores["iwae_nats"].mean() - metrics["iwae_nats"]) < 1e-6 * metrics["iwae_nats"]
    # image by image: the first batch's draws, replayed (the ELBO's sample first, then the bound's)
    x = uint8_to_range(stack(data)[:8], model.config.value_range)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        terms = model.code_length(x, generator, output=model(x))
        bound = iwae_bound(model, x, 3, generator)
    np.testing.assert_allclose(scores.scores["neg_elbo_nats"][:8], (terms["nll"].double() + terms["kl"]).numpy(),
                               rtol=1e-12)
    np.testing.assert_array_equal(scores.scores["iwae_nats"][:8], bound.numpy())
    assert (scores.scores["iwae_nats"] < scores.scores["neg_elbo_nats"] + 50).all()


def test_a_hierarchical_vae_on_binarized_digits_scores_its_bernoulli_negative_elbo():
    torch.manual_seed(0)
    model = vqtok.HierarchicalVAE(vqtok.HierarchicalVAEConfig(
        in_channels=1, resolution=16, scales=(4, 2), groups_per_scale=(1, 1), latent_channels=2, width=8,
        encoder_cells=1, cells_per_group=1)).eval()
    data = digits(12, binarize=True)
    scores = score_images(model, data, iwae=2, batch_size=5)
    metrics = evaluate(model, data, iwae=2, batch_size=5)
    assert abs(scores.scores["neg_elbo_nats"].mean() - metrics["neg_elbo_nats"]) < 1e-6 * metrics["neg_elbo_nats"]
    assert abs(scores.scores["iwae_nats"].mean() - metrics["iwae_nats"]) < 1e-6 * metrics["iwae_nats"]
    with pytest.raises(ValueError, match="Bernoulli likelihood scores binary images only"):
        score_images(model, digits(4))  # grey: no code length under a Bernoulli likelihood


def test_prior_bits_are_the_float64_log_softmax_of_the_priors_logits_at_the_codes():
    tokenizer, data = vq_tokenizer(), digits(5)
    prior = prior_of(tokenizer)
    scores = score_images(tokenizer, data, prior=prior, limit=5)
    x = uint8_to_range(stack(data), tokenizer.config.value_range)
    with torch.no_grad():
        codes = tokenizer.encode(x).flatten(1)  # [5, 64]
        logits = prior(codes).double()  # labels None: the null class, the unconditional pass
    log_p = torch.log_softmax(logits, dim=-1).gather(-1, codes[..., None]).squeeze(-1)
    np.testing.assert_allclose(scores.scores["prior_bits"], (-log_p.sum(1) / math.log(2)).numpy(), rtol=1e-12)
    per_image = [code_nll(logits[i : i + 1].float(), codes[i : i + 1]).item() * 64 / math.log(2) for i in range(5)]
    np.testing.assert_allclose(scores.scores["prior_bits"], per_image, rtol=1e-5)  # the prior's own loss (float32)
    assert 64 * 3 < scores.scores["prior_bits"].min()  # an untrained prior: about log2(16) = 4 bits per code


def test_what_cannot_be_scored_is_refused():
    tokenizer, other, data = vq_tokenizer(0), vq_tokenizer(1), digits(4)
    with pytest.raises(PriorTokenizerMismatch, match="trained on the codes of the tokenizer with weights"):
        score_images(other, data, prior=prior_of(tokenizer))  # the hash the prior recorded
    with pytest.raises(PriorTokenizerMismatch, match="the prior models 8 codes; this tokenizer has 16"):
        score_images(tokenizer, data, prior=prior_of(tokenizer, vocab_size=8))
    with pytest.raises(ValueError, match=r"grids of 4x4 codes \(a sequence of 16\).*8x8 codes"):
        score_images(tokenizer, data, prior=prior_of(tokenizer, grid=(4, 4)))
    with pytest.raises(ValueError, match="this tokenizer is Gaussian"):
        score_images(mixture_vae(), data, prior=prior_of(tokenizer))
    with pytest.raises(ValueError, match="IWAE bound needs a VAE .* this is a VQ tokenizer"):
        score_images(tokenizer, data, iwae=2)
    torch.manual_seed(0)
    mse_vae = vqtok.Autoencoder(tiny_config(GaussianConfig(dim=3), **SMALL)).eval()
    with pytest.raises(ValueError, match="this is a VAE with decoder_output 'image'"):
        score_images(mse_vae, data, iwae=2)
    assert list(score_images(mse_vae, data).scores) == ["mse", "psnr"]  # no discrete likelihood: no ELBO
    with pytest.raises(ValueError, match="this model is unconditional"):
        score_images(tokenizer, data, labels=3)
    with pytest.raises(ValueError, match="no images to score"):
        score_images(tokenizer, torch.utils.data.TensorDataset(torch.zeros(0, 1, 16, 16, dtype=torch.uint8),
                                                               torch.zeros(0)))
    assert tokenizer.training is False


# ---- outputs ---------------------------------------------------------------------------------------------------------


def test_the_csv_holds_every_image_of_every_set_exactly():
    a = ImageScores(np.arange(2), {"mse": np.array([1 / 3, 2.0]), "psnr": np.array([np.inf, 1e-17])})
    b = ImageScores(np.arange(1), {"mse": np.array([5.5]), "psnr": np.array([3.25])})
    rows = list(csv.reader(scores_csv({"data": a, "reference": b}, index_offset=10).splitlines()))
    assert rows[0] == ["set", "index", "mse", "psnr"]
    assert [r[:2] for r in rows[1:]] == [["data", "10"], ["data", "11"], ["reference", "10"]]
    assert float(rows[1][2]) == 1 / 3 and float(rows[1][3]) == np.inf and float(rows[2][3]) == 1e-17
    with pytest.raises(ValueError, match="different score kinds"):
        scores_csv({"data": a, "reference": ImageScores(np.arange(1), {"mse": np.array([1.0])})})


def test_the_histogram_has_a_panel_per_kind_with_both_sets_colours(tmp_path):
    rng = np.random.default_rng(0)
    sets = {"reference": ImageScores(np.arange(50), {"mse": rng.normal(0, 1, 50), "psnr": rng.normal(3, 1, 50)}),
            "data": ImageScores(np.arange(40), {"mse": rng.normal(2, 1, 40),
                                                "psnr": np.r_[rng.normal(0, 1, 39), np.inf]})}
    path = save_histograms(sets, tmp_path / "h.png", aurocs={"mse": 0.9, "psnr": 0.8})
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (2 * PANEL_SIZE[1], PANEL_SIZE[0], 3)
    for panel in (image[: PANEL_SIZE[1]], image[PANEL_SIZE[1] :]):
        for colour in PALETTE[:2]:  # bars (and the legend's square) of both sets in every panel
            assert (panel == colour).all(axis=-1).sum() > 200, colour


# ---- the command ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    mixture_vae().save_pretrained(root / "vae")
    tokenizer = vq_tokenizer()
    tokenizer.save_pretrained(root / "tok")
    prior = prior_of(tokenizer)
    prior.attach_tokenizer(tokenizer)
    prior.save_pretrained(root / "prior")
    other = vq_tokenizer(1)
    other.save_pretrained(root / "other")
    return root


def test_vqtok_score_writes_the_csv_and_histogram_and_prints_each_auroc(capsys, saved, tmp_path):
    out = tmp_path / "s" / "scores.csv"
    argv = ["score", saved / "vae", "--data", "digits", "--reference-data", "digits", "--split", "train",
            "--offset", "100", "--limit", "6", "--iwae", "2", "--batch-size", "4", "--out", out]
    assert main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 6 * 2 and [r["set"] for r in rows] == ["data"] * 6 + ["reference"] * 6
    assert [int(r["index"]) for r in rows[:6]] == list(range(100, 106))
    assert list(rows[0]) == ["set", "index", "mse", "psnr", "neg_elbo_nats", "iwae_nats"]
    found = dict(re.findall(r"^auroc +(\w+) +([01]\.\d{4})$", captured.out, flags=re.MULTILINE))
    assert found == {k: "0.5000" for k in ("mse", "psnr", "neg_elbo_nats", "iwae_nats")}  # the same images twice
    means = re.search(r"^mean +neg_elbo_nats +data (\S+) +reference (\S+)$", captured.out, flags=re.MULTILINE)
    expected = np.mean([float(r["neg_elbo_nats"]) for r in rows[:6]])
    assert means and abs(float(means[1]) - expected) < 1e-5 * expected and means[1] == means[2]
    histogram = Image.open(out.with_name("scores_histogram.png"))
    assert histogram.size == (PANEL_SIZE[0], 4 * PANEL_SIZE[1])
    assert "data:" in captured.err and "reference:" in captured.err  # a progress bar per set
    fails(capsys, [str(a) for a in argv], "score", f"--out {out}: exists", "never replaced")


def test_vqtok_score_with_a_prior_and_without_a_reference(capsys, saved, tmp_path):
    out = tmp_path / "p.csv"
    assert main(["score", str(saved / "tok"), "--data", "digits", "--limit", "3", "--prior", str(saved / "prior"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 3 and list(rows[0]) == ["set", "index", "mse", "psnr", "prior_bits"]
    assert "auroc" not in printed and re.search(r"^mean +prior_bits +data \S+$", printed, flags=re.MULTILINE)
    assert not list(tmp_path.glob("*.png"))


def test_vqtok_score_refuses_with_one_line(capsys, saved, tmp_path):
    base = ["score", "--data", "digits", "--limit", "2"]
    fails(capsys, [*base[:1], saved / "vae", *base[1:], "--histogram", tmp_path / "h.png", "--out", tmp_path / "a.csv"],
          "score", "--histogram", "needs --reference-data")
    fails(capsys, [*base[:1], saved / "vae", *base[1:], "--prior", saved / "prior", "--out", tmp_path / "a.csv"],
          "score", "this tokenizer is Gaussian")
    fails(capsys, [*base[:1], saved / "tok", *base[1:], "--iwae", "4", "--out", tmp_path / "a.csv"],
          "score", "IWAE bound needs a VAE")
    fails(capsys, [*base[:1], saved / "other", *base[1:], "--prior", saved / "prior", "--out", tmp_path / "a.csv"],
          "score", "this prior was trained on the codes of the tokenizer with weights")
    (tmp_path / "a_histogram.png").write_bytes(b"mine")
    fails(capsys, [*base[:1], saved / "vae", *base[1:], "--reference-data", "digits", "--out", tmp_path / "a.csv"],
          "score", "--histogram", "a_histogram.png: exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_histogram.png"]  # nothing written, nothing replaced
    assert (tmp_path / "a_histogram.png").read_bytes() == b"mine"


def test_the_iwae_bound_passes_each_images_labels_with_it_chunk_by_chunk():
    """A class-conditional model's labels follow their images into every call of `log_weights` (a test double that
    records them); without labels none are passed, so an unconditional model's signature is enough."""

    class Recorder:
        def __init__(self):
            self.calls = []

        def log_weights(self, x, num_samples, generator=None, **given):
            self.calls.append((x[:, 0, 0, 0].tolist(), num_samples, given.get("labels", torch.tensor([])).tolist()))
            return torch.zeros(x.shape[0], num_samples)

    x = torch.arange(5.0)[:, None, None, None].expand(5, 1, 2, 2)
    model = Recorder()
    bound = iwae_bound(model, x, 3, batch=4, labels=torch.tensor([7, 8, 9, 7, 8]))
    assert torch.equal(bound, torch.zeros(5, dtype=torch.float64))  # -log mean(exp 0)
    assert model.calls == [([0.0, 1.0, 2.0, 3.0], 1, [7, 8, 9, 7])] * 3 + [([4.0], 3, [8])]
    model.calls.clear()
    iwae_bound(model, x, 2, batch=4)
    assert [labels for *_, labels in model.calls] == [[]] * 3
