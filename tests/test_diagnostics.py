"""Posterior-collapse diagnostics and latent traversals against hand computations: the KL of every latent element
written out as 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) (and as the two-Gaussian KL for a hierarchical VAE's learned
priors), active units from known posterior means with numpy's unbiased variance, unused codes on a hand-made
histogram, evaluate()'s earlier metrics against the values it gave before the diagnostics were added, traversals
of test doubles whose decoder returns its latents, and the command line end to end."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import vqtok
from tests.conftest import tiny_config
from vqtok import Autoencoder, GaussianConfig, VQConfig
from vqtok.bottleneck import DiagonalGaussian
from vqtok.cli import main
from vqtok.config import PreprocessConfig
from vqtok.diagnostics import CodeCounts, LatentStatistics, latent_statistics
from vqtok.latents.traversal import save_traversal_grid, traverse
from vqtok.metrics import code_usage
from vqtok.models.hierarchical_vae import GroupPass, HierarchicalVAE, HierarchicalVAEConfig
from vqtok.train.evaluate import evaluate

# ---- test doubles ---------------------------------------------------------------------------------------------------


class GaussianDouble(nn.Module):
    """A 'Gaussian autoencoder' whose posterior is known: for images x in [0, 1] [B, C, h, w] the mean is 4 x - 2
    and the log-variance a fixed tensor [C, h, w]; decode returns its latents unchanged."""

    def __init__(self, logvar: torch.Tensor):
        super().__init__()
        self.logvar = nn.Parameter(logvar, requires_grad=False)
        self.config = SimpleNamespace(value_range=(0.0, 1.0))
        self.kl_objective = "a VAE"

    def forward(self, x: torch.Tensor):
        posterior = DiagonalGaussian(self.means(x), self.logvar.expand_as(x))
        return SimpleNamespace(bottleneck=SimpleNamespace(posterior=posterior))

    @staticmethod
    def means(x: torch.Tensor) -> torch.Tensor:
        return 4 * x - 2

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class HierarchicalDouble(nn.Module):
    """A 'hierarchical VAE' of two groups with given posteriors and priors (group 0's N(0, I)); decode returns every
    group's latents flattened into one row per image."""

    def __init__(self, passes: list[GroupPass]):
        super().__init__()
        self.passes = passes
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.config = SimpleNamespace(value_range=(0.0, 1.0))
        self.kl_objective = "a VAE"

    def forward(self, x: torch.Tensor):
        return SimpleNamespace(groups=self.passes)

    def decode(self, latents: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([z.flatten(1) for z in latents], dim=1)


def hand_kl(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(N(mu, sigma^2) || N(0, 1)) per element in float64."""
    var = np.exp(logvar)
    return 0.5 * (mu**2 + var - 1 - logvar)


# ---- per-element KL and its sums ------------------------------------------------------------------------------------


def test_the_kl_of_every_element_and_its_channel_sums_are_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    logvar = torch.randn(3, 2, 4, generator=g)
    images = torch.randint(0, 256, (7, 3, 2, 4), generator=g, dtype=torch.uint8)
    statistics = latent_statistics(GaussianDouble(logvar), TensorDataset(images, torch.full((7,), -1)), batch_size=3)

    mu = images.double().numpy() / 255 * 4 - 2
    lv = np.broadcast_to(logvar.double().numpy(), mu.shape)
    expected = hand_kl(mu, lv).mean(axis=0)  # [C, h, w], averaged over the 7 images
    assert statistics.count == 7 and statistics.shapes == [(3, 2, 4)] and statistics.units == 24
    np.testing.assert_allclose(statistics.kl()[0].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(statistics.kl_per_channel(), expected.sum(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(statistics.kl_per_group(), [expected.sum()], rtol=1e-6)
    # the order of the elements: largest KL first
    order = np.argsort(-expected.flatten(), kind="stable")
    assert statistics.ranking() == [(0, *np.unravel_index(i, (3, 2, 4))) for i in order]


def test_a_hierarchical_vaes_kl_per_element_is_against_each_groups_learned_prior():
    """Group l's KL per element against p(z_l | z_<l) at the posterior means of the groups above (the evaluation
    forward's), written out for two Gaussians; its sum over elements is the forward's KL of the group."""
    torch.manual_seed(0)
    model = HierarchicalVAE(HierarchicalVAEConfig(**TINY_HVAE, decoder_output="image")).eval()
    spread_heads(model, 1.0, 5)
    images = torch.randint(0, 2, (6, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8) * 255
    statistics = latent_statistics(model, TensorDataset(images, torch.zeros(6)), batch_size=4)

    x = images.float() / 255
    with torch.no_grad():
        _, passes = model.top_down(6, acts=model.bottom_up(x), sample=False)  # z_l = the posterior means
        out = model(x)
    for g, p in enumerate(passes):
        mq, lq = p.posterior.mean.double().numpy(), p.posterior.logvar.double().numpy()
        mp, lp = p.prior.mean.double().numpy(), p.prior.logvar.double().numpy()
        by_hand = 0.5 * ((mq - mp) ** 2 / np.exp(lp) + np.exp(lq - lp) - 1 - (lq - lp))
        np.testing.assert_allclose(statistics.kl()[g].numpy(), by_hand.mean(axis=0), rtol=1e-5, atol=1e-9)
        if g == 0:
            assert np.all(mp == 0) and np.all(lp == 0)  # the top group's prior is N(0, I)
    forward_kl = [out.bottleneck.terms[f"kl/group_{g}"].item() for g in range(2)]
    np.testing.assert_allclose(statistics.kl_per_group(), forward_kl, rtol=1e-5)
    assert statistics.units == 2 * 2 * 2 + 2 * 4 * 4


# ---- active units ---------------------------------------------------------------------------------------------------


def test_active_units_from_known_posterior_means_just_above_and_below_the_threshold():
    """Four images in two batches; element 0's posterior mean has unbiased variance 0.0101, element 1's 0.0099,
    element 2's 0 (collapsed); all around an offset of 100, where sums of squares would cancel."""
    a_above, a_below = math.sqrt(0.0101 * 3 / 4), math.sqrt(0.0099 * 3 / 4)  # [a, -a, a, -a]: variance 4a^2 / 3
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    means = torch.stack([100 + a_above * signs, 100 + a_below * signs, torch.full((4,), 100.0, dtype=torch.float64)],
                        dim=1).view(4, 3, 1, 1)
    statistics = LatentStatistics()
    statistics.add([torch.zeros(3, 3, 1, 1)], [means[:3]])
    statistics.add([torch.zeros(1, 3, 1, 1)], [means[3:]])

    reference = np.var(means.view(4, 3).numpy(), axis=0, ddof=1)
    np.testing.assert_allclose(statistics.variance()[0].flatten().numpy(), reference, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(reference, [0.0101, 0.0099, 0.0], rtol=1e-9, atol=1e-15)
    assert statistics.active()[0].flatten().tolist() == [True, False, False]
    assert statistics.active_units() == 1 and statistics.active_per_channel() == [1, 0, 0]
    single = LatentStatistics()
    single.add([torch.zeros(1, 3, 1, 1)], [means[:1]])
    assert single.active_units() == 0 and torch.isnan(single.variance()[0]).all()  # one image: no variance


# ---- VQ: unused codes -----------------------------------------------------------------------------------------------


def test_the_fraction_of_unused_codes_on_a_hand_made_histogram():
    counts = torch.tensor([3, 0, 0, 5, 1, 0, 0, 0])
    usage = code_usage(counts)
    assert usage["unused"] == 5 / 8 and usage["usage"] == 3 / 8
    tally = CodeCounts(8)
    tally.add(torch.tensor([[0, 0, 3], [3, 3, 4]]))
    tally.add(torch.tensor([[0, 3, 3]]))
    report = tally.to_dict()
    assert report["code_counts"] == counts.tolist() and report["unused_codes"] == [1, 2, 5, 6, 7]
    assert report["code_unused"] == 5 / 8


# ---- evaluate(): the earlier metrics are unchanged, the new ones add up ---------------------------------------------

TINY_HVAE = dict(in_channels=1, resolution=8, scales=(4, 2), groups_per_scale=(1, 1), latent_channels=2, width=8,
                 encoder_cells=1, cells_per_group=1)

BEFORE = {  # evaluate() on fixed_cases() at commit b94e2ed, before the diagnostics (batch_size 4)
    "gaussian_image": {"psnr": 9.155918647857831, "ssim": 0.016719833388924597, "images": 10,
                       "kl_nats_per_image": 9.414578247070313, "active_units": 120, "latent_units": 192},
    "gaussian_bernoulli": {"psnr": 5.8815582147821965, "ssim": 0.017304407618939876, "images": 10,
                           "nll_bits_per_dim": 1.0230486360650466, "neg_elbo_nats": 186.98852529525757,
                           "neg_elbo_bits_per_dim": 1.0537789771351898, "iwae_nats": 184.68797792849801,
                           "iwae_bits_per_dim": 1.040814179176775, "iwae_samples": 3,
                           "kl_nats_per_image": 5.452966213226318, "active_units": 92, "latent_units": 128},
    "hvae_bernoulli": {"psnr": 5.872108404725944, "ssim": 0.00022647930309176444, "images": 10,
                       "nll_bits_per_dim": 1.0349062207044941, "neg_elbo_nats": 63.568468475341795,
                       "neg_elbo_bits_per_dim": 1.4329674097856564, "iwae_nats": 59.56284545880062,
                       "iwae_bits_per_dim": 1.3426722150726154, "iwae_samples": 3,
                       "kl_nats_per_image": 17.65855941772461, "kl_nats/group_0": 3.31241979598999,
                       "kl_nats/group_1": 14.346139526367187, "active_units": 28, "latent_units": 40,
                       "active_units/group_0": 8, "active_units/group_1": 20},
    "hvae_image": {"psnr": 3.67292710816818, "ssim": -0.008795711677521467, "images": 10,
                   "kl_nats_per_image": 154.29110717773438, "active_units": 40, "latent_units": 40,
                   "active_units/group_0": 8, "active_units/group_1": 32},
    "vq": {"psnr": 9.828158450409934, "ssim": 0.033987747877836226, "images": 10, "code_usage": 0.25,
           "code_perplexity": 1.3789610862731934, "codebook_initialized": True},
}
ADDED = {"gaussian_image": {"kl_nats/channel_0", "kl_nats/channel_1", "kl_nats/channel_2", "active_units/channel_0",
                            "active_units/channel_1", "active_units/channel_2"},
         "gaussian_bernoulli": {"kl_nats/channel_0", "kl_nats/channel_1", "active_units/channel_0",
                                "active_units/channel_1"},
         "hvae_bernoulli": set(), "hvae_image": {"kl_nats/group_0", "kl_nats/group_1"}, "vq": {"code_unused"}}


def spread_heads(model: HierarchicalVAE, scale: float, seed: int) -> HierarchicalVAE:
    """Random last layers for every prior and posterior and larger weights on the way to the posteriors, so that
    q != p, the learned prior is not N(0, I) and the posterior means differ between images."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in model.groups:
            for head in (group.prior, group.posterior):
                for p in () if head is None else (head.c4.weight, head.c4.bias):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
            for conv in (group.posterior.c1, group.posterior.c2, group.posterior.c3):
                conv.weight.mul_(3.0)
        model.stem.weight.mul_(10.0)
    return model


def fixed_cases() -> dict:
    """Five fixed tiny models, each with 10 fixed images and evaluate()'s keywords."""
    g = torch.Generator().manual_seed(3)
    grey16 = torch.randint(0, 256, (10, 1, 16, 16), generator=g, dtype=torch.uint8)
    binary8 = torch.randint(0, 2, (10, 1, 8, 8), generator=g, dtype=torch.uint8) * 255
    binary16 = torch.randint(0, 2, (10, 1, 16, 16), generator=g, dtype=torch.uint8) * 255
    common = dict(in_channels=1, base_channels=8, norm_groups=4, attn_resolutions=(), preprocess=PreprocessConfig())
    cases = {}
    torch.manual_seed(0)
    cases["gaussian_image"] = (Autoencoder(tiny_config(GaussianConfig(dim=3), **common)), grey16, {})
    torch.manual_seed(1)
    cases["gaussian_bernoulli"] = (Autoencoder(tiny_config(GaussianConfig(dim=2), input_range="0,1",
                                   decoder_output="bernoulli_logits", **common)), binary16, {"iwae": 3})
    torch.manual_seed(2)
    cases["hvae_bernoulli"] = (spread_heads(HierarchicalVAE(HierarchicalVAEConfig(**TINY_HVAE)), 1.0, 5), binary8,
                               {"iwae": 3})
    torch.manual_seed(3)
    cases["hvae_image"] = (spread_heads(HierarchicalVAE(HierarchicalVAEConfig(**TINY_HVAE, decoder_output="image")),
                                        1.0, 6), binary8, {})
    torch.manual_seed(4)
    cases["vq"] = (Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4, kmeans_init=False), **common)), grey16, {})
    return {k: (m.eval(), TensorDataset(x, torch.full((len(x),), -1)), kw) for k, (m, x, kw) in cases.items()}


def test_evaluate_keeps_its_earlier_metrics_and_adds_the_diagnostics():
    for name, (model, dataset, keywords) in fixed_cases().items():
        metrics = evaluate(model, dataset, batch_size=4, **keywords)
        assert set(metrics) == set(BEFORE[name]) | ADDED[name], name
        for key, before in BEFORE[name].items():
            if isinstance(before, float):
                assert metrics[key] == pytest.approx(before, rel=1e-5, abs=1e-8), (name, key)
            else:
                assert metrics[key] == before and type(metrics[key]) is type(before), (name, key)
        if name.startswith("gaussian"):  # the KL per channel adds up to the KL per image (analytic either way)
            channels = sum(v for k, v in metrics.items() if k.startswith("kl_nats/channel_"))
            assert channels == pytest.approx(metrics["kl_nats_per_image"], rel=1e-5)
            active = sum(v for k, v in metrics.items() if k.startswith("active_units/channel_"))
            assert active == metrics["active_units"]
        if name.startswith("hvae"):  # at the posterior means (image) or the negative ELBO's samples (bernoulli)
            groups = metrics["kl_nats/group_0"] + metrics["kl_nats/group_1"]
            assert groups == pytest.approx(metrics["kl_nats_per_image"], rel=1e-5)
        if name == "vq":
            assert metrics["code_unused"] == 1 - metrics["code_usage"]


def test_evaluate_fills_the_statistics_it_is_given():
    model, dataset, _ = fixed_cases()["gaussian_image"]
    kept = LatentStatistics()
    metrics = evaluate(model, dataset, batch_size=3, latents=kept)
    alone = latent_statistics(model, dataset, batch_size=3)
    torch.testing.assert_close(kept.kl()[0], alone.kl()[0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(kept.variance()[0], alone.variance()[0], rtol=1e-6, atol=1e-12)
    assert metrics["active_units"] == kept.active_units() == alone.active_units()
    assert metrics["kl_nats/channel_1"] == pytest.approx(kept.kl_per_channel()[1], rel=1e-12)


def test_a_training_run_logs_the_diagnostics_of_a_gaussian_model(tmp_path):
    from tests.scripts.common import tiny_train_config
    from vqtok.train import train

    model = tiny_config(GaussianConfig(dim=2), in_channels=1, base_channels=8, norm_groups=4, attn_resolutions=(),
                        preprocess=PreprocessConfig(resize=16))
    config = tiny_train_config(str(tmp_path / "run"), model=model, loss="gaussian", max_steps=2, eval_every=2,
                               checkpoint_every=2, eval_images=8)
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert evals and all(k in evals[-1] for k in ("active_units", "latent_units", "kl_nats_per_image",
                                                   "kl_nats/channel_0", "kl_nats/channel_1", "active_units/channel_1"))
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["latent_units"] == 2 * 8 * 8 and "kl_nats/channel_0" in final


# ---- traversals -----------------------------------------------------------------------------------------------------


def test_a_traversal_moves_one_element_over_the_values_and_keeps_the_others_at_the_posterior_mean():
    logvar = torch.zeros(2, 2, 2)
    model = GaussianDouble(logvar)
    image = torch.tensor([[[[0.5, 0.6], [0.4, 0.5]], [[0.5, 0.9], [0.5, 0.2]]]])  # means 4x - 2
    statistics = LatentStatistics()  # hand-made KLs: the order is (1, 0, 1), (0, 1, 0), (1, 1, 1), ...
    kl = torch.tensor([[[0.1, 0.0], [0.7, 0.2]], [[0.0, 0.9], [0.05, 0.3]]]).view(1, 2, 2, 2)
    statistics.add([kl], [torch.zeros(1, 2, 2, 2)])
    traversal = traverse(model, image, statistics=statistics, dims=3, steps=5, span=2.0)

    values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    mean = model.means(image)[0]
    assert traversal.images.shape == (3, 5, 2, 2, 2)
    assert [(e.group, e.channel, e.y, e.x) for e in traversal.elements] == [(0, 1, 0, 1), (0, 0, 1, 0), (0, 1, 1, 1)]
    assert [e.kl_nats for e in traversal.elements] == pytest.approx([0.9, 0.7, 0.3])
    for row, e in enumerate(traversal.elements):
        varied = traversal.images[row, :, e.channel, e.y, e.x]
        assert torch.equal(varied, values) and e.values == values.tolist()  # exactly the prior's multiples
        assert e.posterior_mean == pytest.approx(float(mean[e.channel, e.y, e.x]))
        others = torch.ones(2, 2, 2, dtype=torch.bool)
        others[e.channel, e.y, e.x] = False
        for step in range(5):
            assert torch.equal(traversal.images[row, step][others], mean[others])  # the posterior mean, untouched


def test_a_hierarchical_traversal_moves_each_groups_elements_in_its_priors_standard_deviations():
    g = torch.Generator().manual_seed(0)

    def gaussian(shape, mean_scale=1.0, logvar_scale=1.0):
        return DiagonalGaussian(torch.randn(1, *shape, generator=g) * mean_scale,
                                torch.randn(1, *shape, generator=g) * logvar_scale)

    top_posterior, low_posterior, low_prior = gaussian((1, 1, 2)), gaussian((1, 2, 2)), gaussian((1, 2, 2))
    zeros = torch.zeros(1, 1, 1, 2)
    passes = [GroupPass(DiagonalGaussian(zeros, zeros), top_posterior, top_posterior.mean),
              GroupPass(low_prior, low_posterior, low_posterior.mean)]
    traversal = traverse(HierarchicalDouble(passes), torch.zeros(1, 1, 8, 8), dims=2, steps=3, span=3.0)

    kl = [p.posterior.kl(p.prior)[0] for p in passes]  # this image's own KL orders the rows when no dataset is given
    rows = traversal.elements
    assert [e.group for e in rows] == [0, 0, 1, 1]
    for group in (0, 1):  # each group's two elements of largest KL, largest first
        mine = [e for e in rows if e.group == group]
        assert [e.kl_nats for e in mine] == pytest.approx(sorted(kl[group].flatten().tolist(), reverse=True)[:2])
        assert [e.kl_nats for e in mine] == pytest.approx([float(kl[group][e.channel, e.y, e.x]) for e in mine])
    flat_means = torch.cat([top_posterior.mean.flatten(), low_posterior.mean.flatten()])
    offsets = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)
    for row, e in enumerate(rows):
        prior = passes[e.group].prior
        prior_mean, prior_std = prior.mean[0, e.channel, e.y, e.x], prior.std[0, e.channel, e.y, e.x]
        expected = (float(prior_mean) + offsets * float(prior_std)).float()
        shape = passes[e.group].posterior.mean.shape[1:]
        index = [0, 2][e.group] + int(np.ravel_multi_index((e.channel, e.y, e.x), tuple(shape)))
        decoded = traversal.images[row]  # [steps, 6]: group 0's two elements, then group 1's four
        assert torch.equal(decoded[:, index], expected)
        if e.group == 0:
            assert torch.equal(decoded[:, index], offsets.float())  # the top group's prior is N(0, 1)
        others = [i for i in range(6) if i != index]
        assert torch.equal(decoded[:, others], flat_means[others].expand(3, -1))


def test_a_traversal_grid_has_a_row_per_element_and_a_column_per_value(tmp_path):
    torch.manual_seed(0)
    model = Autoencoder(tiny_config(GaussianConfig(dim=2), in_channels=1, base_channels=8, norm_groups=4,
                                    attn_resolutions=())).eval()
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    traversal = traverse(model, x, dims=4, steps=6)
    path = save_traversal_grid(model, traversal, tmp_path / "grid.png")
    with Image.open(path) as grid:  # 16x16 images are enlarged to 64x64, with make_grid's 2-pixel padding
        assert grid.size == (6 * 66 + 2, 4 * 66 + 2)
    assert len(traversal.elements) == 4 and traversal.offsets.tolist() == pytest.approx([-3, -1.8, -0.6, 0.6, 1.8, 3])


def test_traversals_refuse_what_they_cannot_do():
    torch.manual_seed(0)
    vq = Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4, kmeans_init=False), in_channels=1)).eval()
    with pytest.raises(ValueError, match="a VQ tokenizer cannot be traversed: its latents are discrete codes"):
        traverse(vq, torch.zeros(1, 1, 16, 16))
    model = GaussianDouble(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="dims 9: the latents have only 8 elements"):
        traverse(model, torch.zeros(1, 2, 2, 2), dims=9)
    with pytest.raises(ValueError, match=r"one image \[1, C, H, W\]"):
        traverse(model, torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match="steps must be >= 2"):
        traverse(model, torch.zeros(1, 2, 2, 2), steps=1)
    other = LatentStatistics()
    other.add([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 2, 4, 4)])
    with pytest.raises(ValueError, match="the statistics that order the rows are of latents"):
        traverse(model, torch.zeros(1, 2, 2, 2), statistics=other)


def test_class_conditional_models_are_given_the_labels_and_unconditional_ones_none():
    """The conditional-model contract (AutoencoderConfig.num_classes > 0): the dataset's labels reach the model, an
    image without one (-1) gets the null label num_classes; a traversal's label reaches encoder and decoder."""

    class Conditional(GaussianDouble):
        def __init__(self):
            super().__init__(torch.zeros(1, 1, 1))
            self.config = SimpleNamespace(value_range=(0.0, 1.0), num_classes=3)
            self.seen = []

        def forward(self, x, labels=None):
            self.seen.append(("encode", labels))
            return super().forward(x)

        def decode(self, z, labels=None):
            self.seen.append(("decode", labels))
            return z

    model = Conditional()
    images = torch.zeros(3, 1, 1, 1, dtype=torch.uint8)
    latent_statistics(model, TensorDataset(images, torch.tensor([-1, 2, 0])))
    assert [(verb, labels.tolist()) for verb, labels in model.seen] == [("encode", [3, 2, 0])]
    model.seen.clear()
    traverse(model, torch.zeros(1, 1, 1, 1), dims=1, steps=2, labels=1)
    assert model.seen == [("encode", 1), ("decode", 1)]
    with pytest.raises(ValueError, match="labels were given, but this .* is not class-conditional"):
        traverse(GaussianDouble(torch.zeros(1, 1, 1)), torch.zeros(1, 1, 1, 1), dims=1, labels=1)


# ---- the command line -----------------------------------------------------------------------------------------------


def error_line(capsys, argv: list) -> str:
    """Run the CLI, expect status 1 and one line `vqtok COMMAND: error: ...` last on stderr; returns it."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("diagnostics")
    torch.manual_seed(0)
    grey = dict(in_channels=1, preprocess=PreprocessConfig(resize=16))
    vqtok.Autoencoder(tiny_config(GaussianConfig(dim=3), **grey)).save_pretrained(root / "vae")
    vqtok.Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4, kmeans_init=False), **grey)).save_pretrained(
        root / "vq")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8)).save(root / "image.png")
    (root / "text.png").write_text("not an image")
    return {"root": root, "vae": root / "vae", "vq": root / "vq", "image": root / "image.png",
            "text": root / "text.png"}


def test_eval_prints_the_diagnostics_and_writes_the_per_element_arrays(capsys, saved, tmp_path):
    from vqtok.config import DataConfig
    from vqtok.data import build_dataset

    out = tmp_path / "diagnostics.json"
    assert main(["eval", str(saved["vae"]), "--data", "digits", "--limit", "30", "--diagnostics", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kl_nats/channel_2" in printed and "active_units/channel_0" in printed and "latent_units" in printed
    report = json.loads(out.read_text())
    model = vqtok.load(saved["vae"])
    dataset = build_dataset(DataConfig(source="digits", split="test", limit=30), channels=1,
                            preprocess=model.config.preprocess, size=None, multiple=model.size_multiple())
    reference = latent_statistics(model, dataset)
    group = report["groups"][0]
    assert report["images"] == 30 and group["shape"] == [3, 8, 8] and report["latent_units"] == 192
    np.testing.assert_allclose(group["kl_nats"], reference.kl()[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(group["posterior_mean_variance"], reference.variance()[0].numpy(), rtol=1e-6)
    assert group["active"] == reference.active()[0].tolist()
    ranked = report["elements_by_kl"]
    assert len(ranked) == 192 and all(a["kl_nats"] >= b["kl_nats"] for a, b in zip(ranked, ranked[1:]))
    assert report["metrics"]["active_units"] == sum(e["active"] for e in ranked) == reference.active_units()
    again = ["eval", saved["vae"], "--data", "digits", "--limit", "3", "--diagnostics", out]
    assert error_line(capsys, again).endswith("exists; remove it or choose another name (it is never replaced)")

    codes = tmp_path / "codes.json"
    assert main(["eval", str(saved["vq"]), "--data", "digits", "--limit", "10", "--diagnostics", str(codes)]) == 0
    assert "code_unused" in capsys.readouterr().out
    counted = json.loads(codes.read_text())
    assert sum(counted["code_counts"]) == 10 * 8 * 8 and len(counted["code_counts"]) == 16
    assert counted["code_unused"] == len(counted["unused_codes"]) / 16 == counted["metrics"]["code_unused"]


def test_traverse_writes_a_grid_ordered_by_the_datas_kl_and_refuses_what_it_cannot_do(capsys, saved, tmp_path):
    out = tmp_path / "grid.png"
    argv = ["traverse", saved["vae"], saved["image"], "--out", out, "--dims", "3", "--steps", "5", "--data", "digits",
            "--limit", "20"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "row 2: group 0, channel" in printed and "ordered by their average KL over 20 images of digits" in printed
    with Image.open(out) as grid:
        assert grid.size == (5 * 66 + 2, 3 * 66 + 2)
    assert error_line(capsys, argv).endswith(f"--out {out}: exists; remove it or choose another name (it is never replaced)")
    again = tmp_path / "again.png"
    assert error_line(capsys, ["traverse", saved["vq"], tmp_path / "none.png", "--out", again]).endswith(  # at once
        "a VQ tokenizer cannot be traversed: its latents are discrete codes, with no Gaussian posterior or prior along "
        "which one element could move continuously; traversals need a Gaussian autoencoder or a hierarchical VAE")
    assert "cannot read image" in error_line(capsys, ["traverse", saved["vae"], saved["text"], "--out", again])
    assert "No such file" in error_line(capsys, ["traverse", saved["vae"], tmp_path / "none.png", "--out", again])
    assert "is not a class-conditional model" in error_line(
        capsys, ["traverse", saved["vae"], saved["image"], "--out", again, "--class", "1"])
    without_data = ["traverse", saved["vae"], saved["image"], "--out", again, "--limit", "3", "--batch-size", "2"]
    assert error_line(capsys, without_data).endswith(
        "--limit, --batch-size: for reading --data, whose KL orders the rows; give --data")
    assert not again.exists()
