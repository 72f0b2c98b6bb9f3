"""Residual VQ: each level's exact nearest code of its residual (float64), the reconstruction error falling with
depth, prefix decodes, one straight-through gradient for the sum, the levels' k-means in order, quantizer dropout,
the sync-free step and a masked skip, the peer's codes, strict save/load, config errors, per-level code counts, and
an RVQ tokenizer through `vqtok encode` -> `vqtok train-prior` -> `vqtok sample` -> `vqtok decode`."""

import json
import re

import numpy as np
import pytest
import torch

import vqtok
import vqtok.cli
from tests.conftest import tiny_config
from tests.host_sync import no_host_sync
from tests.scripts.common import bottleneck_config_error, saved_and_reloaded, tiny_train_config
from vqtok.bottleneck import ResidualVectorQuantizer, RVQConfig, build_bottleneck
from vqtok.config import TrainConfig, load_yaml
from vqtok.data import TokenDataset
from vqtok.data.token_store import TokenStoreError
from vqtok.diagnostics import CodeCounts
from vqtok.train.loop import train
from vqtok.train.prior import unigram_bits


def rvq(**kw) -> ResidualVectorQuantizer:
    torch.manual_seed(0)
    settings = dict(depth=3, codebook_size=16, dim=4, kmeans_init=False)
    settings.update(kw)
    return ResidualVectorQuantizer(RVQConfig(**settings))


def initialised(**kw) -> ResidualVectorQuantizer:
    """Every level past its k-means initialisation, level by level, on one fixed batch of features."""
    q = rvq(kmeans_init=True, kmeans_samples=64, kmeans_iters=5, **kw).train()
    h = features()
    for _ in range(3 * q.config.depth):
        q(h)
        q.on_optimizer_step()
    assert bool(q.initialized)
    return q


def features(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2


def rows(h: torch.Tensor) -> torch.Tensor:
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])


def test_each_level_searches_the_exact_nearest_code_of_its_residual():
    q = rvq(depth=4, codebook_size=64).eval()
    h = features(4)
    codes = q.encode(h)
    assert codes.shape == (4, 8, 8, 4) and codes.dtype == torch.long
    residual = rows(h).double()
    for level in range(4):
        codebook = q.levels[level].codebook.double()
        expected = torch.cdist(residual, codebook).argmin(dim=1)
        assert torch.equal(codes[..., level].flatten(), expected), level
        residual = residual - codebook[expected]
    assert torch.equal(q(h).codes, codes)  # forward's codes are encode's


def test_the_reconstruction_error_does_not_increase_with_depth():
    q = initialised(depth=4).eval()
    h = features()
    codes = q.encode(h)
    errors = [(q.decode(codes[..., :r]) - h).square().mean().item() for r in range(1, 5)]
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]
    assert h.square().mean().item() > errors[0]


def test_a_prefix_decode_is_the_sum_of_the_prefix_codes():
    q = rvq().eval()
    h = features()
    codes = q.encode(h)
    for r in (1, 2, 3):
        expected = sum(q.levels[level].codebook.double()[codes[..., level]] for level in range(r))
        got = q.decode(codes[..., :r])
        assert got.shape == (2, 4, 8, 8) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected.permute(0, 3, 1, 2), rtol=0, atol=1e-6)
    assert torch.equal(q.decode(codes), q(h).z)  # the decoder's input at full depth
    assert torch.equal(q.decode(codes.to(torch.uint8)), q.decode(codes))  # a token store's dtype


def test_one_straight_through_gradient_for_the_sum_and_each_levels_commitment():
    q = rvq(beta=0.0).train()
    h = features().requires_grad_()
    g = torch.randn(2, 4, 8, 8)
    (q(h).z * g).sum().backward()
    assert torch.equal(h.grad, g)  # d out / d h = I whatever the depth (not depth x I)
    q = rvq(beta=0.25).train()
    h = features().requires_grad_()
    out = q(h)
    residual, expected = h.detach().double(), 0.0
    for level in range(3):
        quantized = q.levels[level].codebook.double()[out.codes[..., level]].permute(0, 3, 1, 2)
        expected += 0.25 * (residual - quantized).square().mean()
        residual = residual - quantized
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.terms["commitment"].item() == pytest.approx(expected.item() / 0.25, rel=1e-5)
    out.loss.backward()  # the commitment of every level reaches the encoder
    assert h.grad.abs().sum() > 0


def test_levels_initialise_in_order_on_the_residuals_of_initialised_levels():
    q = rvq(depth=2, kmeans_init=True, kmeans_samples=128).train()
    h = features()  # 128 vectors: one batch fills a level's reservoir
    q(h)
    assert "level_0/kmeans_samples" in q.on_optimizer_step()
    assert bool(q.levels[0].initialized) and not bool(q.levels[1].initialized)
    q(h)  # level 1 gathers the residuals of the initialised level 0
    stats = q.on_optimizer_step()
    assert "level_1/kmeans_samples" in stats and bool(q.initialized)
    residual = rows(h) - q.levels[0].codebook[q.encode(h)[..., 0].flatten()]
    # level 1's codes are k-means centres of those residuals: each is the mean of residuals (its cluster)
    assert (torch.cdist(residual, q.levels[1].codebook).min(dim=1).values.square().mean()
            < residual.square().sum(1).mean() * 0.5)


def test_quantizer_dropout_gives_each_image_a_prefix_keyed_by_step_and_micro_batch():
    q = initialised(depth=3, quantizer_dropout=1.0)
    h = features(64)
    out = q(h)
    prefixes = []
    for b in range(64):
        matches = [r for r in (1, 2, 3) if torch.allclose(out.z[b], q.decode(out.codes[b : b + 1, ..., :r])[0],
                                                          atol=1e-6)]
        assert len(matches) == 1
        prefixes += matches
    counts = np.bincount(prefixes, minlength=4)[1:]
    assert counts.min() >= 10, counts  # uniform in 1..3
    q._micro_batches = 0  # forward's draw again: a function of (rng_seed, steps, micro-batch, image)
    masks = q._dropout_masks(h)
    assert masks.view(3, 64).sum(0).long().tolist() == prefixes
    q._micro_batches += 1  # the next micro-batch of the same step draws anew
    assert not torch.equal(q._dropout_masks(h), masks)
    q._micro_batches -= 1
    assert torch.equal(q._dropout_masks(h), masks)
    q._micro_batches = 1  # as forward left it
    q.on_optimizer_step()  # the next step draws anew (and starts its micro-batches at 0)
    assert q._micro_batches == 0 and not torch.equal(q._dropout_masks(h), masks)
    assert torch.equal(q.eval()(h).z, q.decode(q.encode(h)))  # no dropout in eval mode
    full = initialised(depth=3, quantizer_dropout=0.0)
    assert torch.equal(full(h).z, full.decode(full.encode(h)))


def test_dropout_draws_change_from_the_first_step_while_the_levels_wait_for_k_means():
    q = rvq(depth=2, kmeans_init=True, kmeans_samples=4096, quantizer_dropout=1.0).train()  # never initialised here
    h = features(16)  # 1,024 vectors a step
    draws = []
    for _ in range(3):
        q(h)
        q._micro_batches = 0
        draws.append(q._dropout_masks(h))
        q._micro_batches = 1
        q.on_optimizer_step()
    assert int(q.steps) == 3 and int(q.levels[0].steps) == 0 and not bool(q.levels[0].initialized)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    q.eval()(h)
    assert q.on_optimizer_step() == {} and int(q.steps) == 3  # no training forward: no step


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_training_step_is_sync_free_and_a_skipped_one_leaves_every_buffer(dropout):
    q = initialised(depth=2, dead_threshold=0.5, quantizer_dropout=dropout)
    h = features(seed=3).requires_grad_()
    with no_host_sync():
        out = q(h)
        (out.z.square().mean() + out.loss).backward()
        stats = q.on_optimizer_step(torch.tensor(False))
    assert {"usage", "perplexity", "level_0/usage", "level_1/perplexity", "level_1/restarted"} <= set(stats)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with no_host_sync():
        q(features(seed=4) * 3)
        q.on_optimizer_step(torch.tensor(True))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    q(features(seed=4) * 3)
    q.on_optimizer_step(torch.tensor(False))
    assert int(q.steps) == int(before["steps"]) + 1 and int(q.levels[0].steps) == int(before["levels.0.steps"]) + 1


def test_codes_equal_the_peers_residual_vq_with_the_same_codebooks():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    q = rvq(depth=3, codebook_size=32).eval()
    peer = vqp.ResidualVQ(dim=4, num_quantizers=3, codebook_size=32).eval()
    with torch.no_grad():
        for ours, theirs in zip(q.levels, peer.layers):
            theirs._codebook.embed.copy_(ours.codebook[None])
            theirs._codebook.initted.fill_(True)
    h = features(4)
    quantized, indices, _ = peer(rows(h).view(4, 64, 4))  # the peer's [B, N, D] sequences
    assert torch.equal(q.encode(h).view(4, 64, 3), indices.long())
    torch.testing.assert_close(rows(q.eval()(h).z).view(4, 64, 4), quantized, rtol=0, atol=1e-5)


def test_save_load_is_strict_and_the_card_says_rvq(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(RVQConfig(depth=2, codebook_size=16, dim=4, kmeans_samples=64, quantizer_dropout=0.25))
    model = vqtok.Autoencoder(config).train()
    model(torch.rand(2, 3, 16, 16) * 2 - 1)
    model.on_optimizer_step()
    keys = sorted(k for k in model.state_dict() if k.startswith("bottleneck."))
    assert "bottleneck.levels.1.codebook" in keys and "bottleneck.rng_seed" in keys
    loaded, saved = saved_and_reloaded(model, tmp_path, required_key="bottleneck.levels.1.codebook")
    assert saved["bottleneck"]["kind"] == "rvq" and saved["bottleneck"]["depth"] == 2 and saved["vocab_size"] == 16
    assert loaded.code_shape == (8, 8, 2)
    readme = (tmp_path / "tok" / "README.md").read_text()
    assert "residual VQ image tokenizer" in readme and "[B, h, w, 2]" in readme


@pytest.mark.parametrize("bottleneck, match", [
    ({"kind": "rvq", "depth": 0}, "depth must be an integer >= 1, got 0"),
    ({"kind": "rvq", "depth": 1, "quantizer_dropout": 0.5}, "quantizer_dropout 0.5 needs depth >= 2"),
    ({"kind": "rvq", "quantizer_dropout": 1.5}, r"quantizer_dropout must be in \[0, 1\], got 1.5"),
    ({"kind": "rvq", "l2_normalize": True}, "l2_normalize is not supported by rvq"),
    ({"kind": "rvq", "rotation_trick": True}, "rotation_trick is not supported by rvq"),
    ({"kind": "rvq", "codebook_size": 1}, "codebook_size must be >= 2"),
    ({"kind": "rvq", "levels": [8, 5]}, "unknown key"),
])
def test_bad_configs_are_refused_in_one_line(tmp_path, bottleneck, match):
    assert re.search(match, bottleneck_config_error(tmp_path, bottleneck))


def test_bad_codes_are_refused_in_one_line():
    q = rvq(depth=2)
    for codes, match in [(torch.zeros(2, 8, 8, dtype=torch.long), r"\[B, h, w, r\] with 1 <= r <= 2"),
                         (torch.zeros(2, 8, 8, 3, dtype=torch.long), r"1 <= r <= 2"),
                         (torch.zeros(2, 8, 8, 0, dtype=torch.long), r"1 <= r <= 2"),
                         (torch.full((2, 8, 8, 2), 16), r"lie in \[0, 16\)"),
                         (torch.zeros(2, 8, 8, 2), "integer tensor")]:
        with pytest.raises((ValueError, TypeError), match=match):
            q.decode(codes)


def test_code_counts_per_level():
    codes = torch.tensor([[[[0, 1], [2, 1]]], [[[0, 3], [0, 0]]]])  # [2, 1, 2, 2]: levels last
    counts = CodeCounts(4, depth=2)
    counts.add(codes)
    assert counts.counts.tolist() == [3, 0, 1, 0] + [1, 2, 0, 1]
    usage = counts.usage()
    assert usage["usage"] == pytest.approx(5 / 8) and usage["usage/level_0"] == pytest.approx(0.5)
    p0, p1 = np.array([3, 1]) / 4, np.array([1, 2, 1]) / 4
    perplexities = [np.exp(-(p * np.log(p)).sum()) for p in (p0, p1)]
    assert usage["perplexity/level_1"] == pytest.approx(perplexities[1], rel=1e-5)
    assert usage["perplexity"] == pytest.approx(np.mean(perplexities), rel=1e-5)
    report = counts.to_dict()
    assert report["code_counts"] == [[3, 0, 1, 0], [1, 2, 0, 1]] and report["unused_codes"] == [[1, 3], [2]]


def test_an_rvq_tokenizer_goes_through_encode_train_prior_sample_and_decode(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    bottleneck = RVQConfig(depth=2, codebook_size=16, dim=4, kmeans_samples=64, quantizer_dropout=0.5)
    tok = train(tiny_train_config("run", vq=bottleneck, max_steps=6))
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert {"code_usage/level_0", "code_perplexity/level_1"} <= set(metrics) and metrics["codebook_initialized"]
    assert vqtok.cli.main(["info", str(tok)]) == 0
    info = capsys.readouterr().out
    assert '"kind": "rvq"' in info and '"level_1/usage"' in info
    assert vqtok.cli.main(["encode", "--tokenizer", str(tok), "--data", "digits", "--limit", "64", "--out", "store",
                           "--num-workers", "0"]) == 0
    store = TokenDataset("store")
    assert store.grid == (8, 8, 2) and store.manifest["item_shape"] == [1, 8, 8, 2]
    assert store.manifest["dtype"] == "uint8" and store[0][0].shape == (8, 8, 2)
    items = np.arange(len(store))
    stored = np.stack([store[int(i)][0].numpy() for i in items])
    entropies = []
    for level in range(2):  # the prior's unigram baseline: each level's marginal, not the levels' codes pooled
        counts = np.bincount(stored[..., level].ravel(), minlength=16)
        p = counts[counts > 0] / counts.sum()
        entropies.append(-(p * np.log2(p)).sum())
    assert unigram_bits(store, items) == pytest.approx(np.mean(entropies), rel=1e-9)
    tokenizer = vqtok.load(tok)
    (tmp_path / "prior.yaml").write_text(
        "tokens: store\noutput_dir: prior\nmax_steps: 2\nbatch_size: 8\nwarmup_steps: 1\neval_every: 2\n"
        "checkpoint_every: 2\nlog_every: 1\nnum_samples: 2\nprior: {n_layer: 1, n_head: 2, n_embd: 16}\n")
    assert vqtok.cli.main(["train-prior", "prior.yaml"]) == 0
    prior = vqtok.load("prior/prior")
    assert prior.config.grid == (8, 8, 2) and prior.config.vocab_size == 16 and prior.config.seq_len == 128
    assert vqtok.cli.main(["sample", "--prior", "prior/prior", "--n", "3", "--out", "s.png", "--codes", "c.npy",
                           "--seed", "0"]) == 0
    codes = np.load("c.npy")
    assert codes.shape == (3, 8, 8, 2) and codes.min() >= 0 and codes.max() < 16
    assert torch.equal(torch.from_numpy(codes), prior.generate(3, seed=0))
    np.save("coarse.npy", codes[..., :1])  # a prefix: the first level only
    assert vqtok.cli.main(["decode", "coarse.npy", "--tokenizer", str(tok), "--out", "d.png"]) == 0
    np.save("deep.npy", np.concatenate([codes, codes[..., :1]], axis=-1))  # three levels of a two-level RVQ
    assert vqtok.cli.main(["decode", "deep.npy", "--tokenizer", str(tok), "--out", "f.png"]) == 1
    assert "deep.npy: a residual VQ of 2 levels decodes codes [n, h, w, r] with 1 <= r <= 2" in capsys.readouterr().err
    np.save("flat.npy", codes[..., 0])
    assert vqtok.cli.main(["decode", "flat.npy", "--tokenizer", str(tok), "--out", "e.png"]) == 1
    assert "codes must be integers [n, h, w, r]" in capsys.readouterr().err
    assert tokenizer.decode(torch.from_numpy(codes)).shape == (3, 1, 16, 16)


def test_a_store_whose_items_disagree_with_the_tokenizers_depth_is_refused(tmp_path):
    torch.manual_seed(0)
    tok = train(tiny_train_config(str(tmp_path / "run"), vq=RVQConfig(depth=2, codebook_size=16, dim=4,
                                                                      kmeans_samples=64), max_steps=3))
    assert vqtok.cli.main(["encode", "--tokenizer", str(tok), "--data", "digits", "--limit", "8", "--out",
                           str(tmp_path / "store"), "--num-workers", "0"]) == 0
    manifest_path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizer"]["config"]["bottleneck"]["depth"] = 3
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(TokenStoreError, match="items hold 2 residual levels .* the recorded tokenizer has 3"):
        TokenDataset(tmp_path / "store")
    manifest["tokenizer"]["config"]["bottleneck"]["depth"] = 2
    manifest["grid"] = [8, 8]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(TokenStoreError, match="grid .* is not one view's code shape"):
        TokenDataset(tmp_path / "store")


def test_build_bottleneck_and_the_config_union():
    assert isinstance(build_bottleneck(RVQConfig(codebook_size=8, dim=2)), ResidualVectorQuantizer)
    assert RVQConfig(depth=3, codebook_size=8, dim=2).level_config == vqtok.VQConfig(codebook_size=8, dim=2)
    config = load_yaml("configs/cifar10_rvq.yaml", TrainConfig)
    assert config.model.bottleneck == RVQConfig(depth=2, codebook_size=32, dim=64)


def test_bf16_autocast_quantizes_in_float32():
    q = rvq(depth=3).train()
    h = features(4).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(h)
    assert out.z.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.equal(out.codes, q.eval().encode(h.detach().float()))  # the bf16 values' float32 search
    assert torch.equal(out.z, q.decode(out.codes).bfloat16())
    out.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad.float()).all()


def test_rotary_positions_are_refused_for_a_residual_grid():
    from vqtok.config import ConfigError, PriorConfig

    assert PriorConfig(vocab_size=16, grid=(8, 8), num_classes=0, positions="rotary").grid == (8, 8)
    with pytest.raises(ConfigError, match=r"rotary positions cannot tell a residual VQ's levels apart \(grid \[8, 8"):
        PriorConfig(vocab_size=16, grid=(8, 8, 2), num_classes=0, positions="rotary")


def test_the_warning_for_levels_never_initialised_names_the_residual_levels():
    from vqtok.train.evaluate import codebook_warnings

    config = RVQConfig(depth=3, codebook_size=16, dim=4, kmeans_samples=64)
    [warning] = codebook_warnings({"codebook_initialized": False, "train_code_usage": None}, config, 7)
    assert "residual VQ codebook was never initialised" in warning and "7 training steps" in warning
    assert "all 3 levels" in warning and "\n" not in warning
