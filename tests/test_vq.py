"""The vector quantizer: straight-through gradients, beta on the encoder term, the EMA update on a hand-computed
case, float32 state under bf16, one codebook change per optimizer step, restarts, k-means, statistics."""

import math

import pytest
import torch

from tests.conftest import tiny_config
from vqtok import Autoencoder
from vqtok.bottleneck import VectorQuantizer
from vqtok.config import VQConfig
from vqtok.metrics import perplexity


def as_features(z: torch.Tensor) -> torch.Tensor:
    """[N, D] vectors -> features [1, D, 1, N]; the quantizer sees the same N vectors in the same order."""
    return z.t()[None, :, None, :]


def quantizer(**kw) -> VectorQuantizer:
    kw = {"kmeans_init": False, "dead_threshold": 0.0, **kw}
    return VectorQuantizer(VQConfig(**kw)).train()


def set_codebook(vq: VectorQuantizer, rows) -> None:
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor(rows, dtype=torch.float32))


# ---- gradients and losses ------------------------------------------------------------------------------------------


def test_straight_through_gradient_is_identity_to_the_features():
    vq = quantizer(codebook_size=16, dim=3, beta=0.0)
    h = torch.randn(2, 3, 4, 4, requires_grad=True)
    weight = torch.randn(2, 3, 4, 4)
    out = vq(h)
    (out.z * weight).sum().backward()
    assert torch.equal(h.grad, weight)


def test_beta_scales_only_the_encoder_term():
    """grad_z = beta * 2(z - e)/n and grad_e = w * 2(e - z)/n. taming's legacy placement gives grad_z = 2(z - e)/n
    and grad_e = beta * 2(e - z)/n, and fails both checks."""
    beta, weight = 0.25, 1.0
    vq = quantizer(codebook_size=4, dim=2, beta=beta, ema=False, codebook_weight=weight)
    set_codebook(vq, [[0, 0], [4, 0], [0, 4], [4, 4]])
    z = torch.tensor([[1.0, 0.5], [3.0, 3.5], [0.2, 3.0]], requires_grad=True)
    out = vq(as_features(z))
    out.loss.backward()
    e = vq.codebook.detach()[torch.tensor([0, 3, 2])]
    n = z.numel()
    torch.testing.assert_close(z.grad, beta * 2 * (z.detach() - e) / n)
    expected_codebook_grad = torch.zeros(4, 2)
    expected_codebook_grad.index_add_(0, torch.tensor([0, 3, 2]), weight * 2 * (e - z.detach()) / n)
    torch.testing.assert_close(vq.codebook.grad, expected_codebook_grad)
    torch.testing.assert_close(out.terms["commitment"], ((z.detach() - e) ** 2).mean())


def test_ema_codebook_gets_no_gradient_and_loss_is_commitment_only():
    vq = quantizer(codebook_size=8, dim=2, beta=0.5)
    assert "codebook" in dict(vq.named_buffers()) and not list(vq.parameters())
    out = vq(torch.randn(1, 2, 3, 3))
    assert set(out.terms) == {"commitment"}
    torch.testing.assert_close(out.loss, 0.5 * out.terms["commitment"])


def test_straight_through_reaches_the_encoder_of_the_tokenizer(vq_config, images):
    model = Autoencoder(vq_config).train()
    out = model(images)
    (out.reconstruction - images).pow(2).mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


# ---- the EMA update --------------------------------------------------------------------------------------------------


def test_ema_update_matches_hand_computed_case():
    eps = 1e-5
    vq = quantizer(codebook_size=3, dim=2, decay=0.5, eps=eps)
    set_codebook(vq, [[0, 0], [10, 0], [0, 10]])
    # Step 1: vectors go to codes 0, 0, 1.  n = [2, 1, 0], s = [[0, 0], [9, 1], [0, 0]].
    vq(as_features(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [9.0, 1.0]])))
    vq.on_optimizer_step()
    # N = 0.5 n = [1, .5, 0]; m = 0.5 s; debiased by 1 - 0.5 = 0.5: N^ = [2, 1, 0], m^ = s.
    e1 = [(9 + eps * 10) / (1 + eps), (1 + eps * 0) / (1 + eps)]
    expected = torch.tensor([[0.0, 0.0], e1, [0.0, 10.0]], dtype=torch.float64)
    torch.testing.assert_close(vq.codebook.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vq.ema_count, torch.tensor([1.0, 0.5, 0.0]))
    # Step 2: one vector [0, 9] -> code 2.  N = [.5, .25, .5], m2 = [0, 4.5]; debias 1 - .25 = .75.
    vq(as_features(torch.tensor([[0.0, 9.0]])))
    vq.on_optimizer_step()
    n_hat = [0.5 / 0.75, 0.25 / 0.75, 0.5 / 0.75]
    e1_new = [(0.25 * 9 / 0.75 + eps * e1[0]) / (n_hat[1] + eps), (0.25 * 1 / 0.75 + eps * e1[1]) / (n_hat[1] + eps)]
    e2_new = [0.0, (4.5 / 0.75 + eps * 10) / (n_hat[2] + eps)]
    expected = torch.tensor([[0.0, 0.0], e1_new, e2_new], dtype=torch.float64)
    torch.testing.assert_close(vq.codebook.double(), expected, rtol=1e-6, atol=1e-6)
    # Used codes agree with Sonnet's Laplace-smoothed m^ / N~ to within eps / N^.
    total = sum(n_hat)
    sonnet = [(n + eps) / (total + 3 * eps) * total for n in n_hat]
    assert abs(vq.codebook[2, 1].item() - 6.0 / sonnet[2]) / 9 < 1e-4


def test_unused_codes_neither_blow_up_nor_collapse():
    vq = quantizer(codebook_size=4, dim=2, decay=0.9)
    set_codebook(vq, [[0, 0], [5, 5], [-5, 5], [100, 100]])
    for _ in range(300):
        vq(as_features(torch.randn(64, 2) * 0.1))
        vq.on_optimizer_step()
    assert torch.equal(vq.codebook[3], torch.tensor([100.0, 100.0]))


def test_state_stays_float32_under_bf16():
    model = Autoencoder(tiny_config(VQConfig(codebook_size=16, dim=4, kmeans_init=False))).train()
    codebook = model.bottleneck.codebook.clone()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.reconstruction.float().mean().backward()
    model.on_optimizer_step()
    names = ("codebook", "ema_count", "ema_sum", "ema_sq_error")
    assert all(getattr(model.bottleneck, n).dtype == torch.float32 for n in names)
    updated = model.bottleneck.codebook.clone()
    assert not torch.equal(updated, codebook)
    model.to(torch.bfloat16)
    assert model.encoder.conv_in.weight.dtype == torch.bfloat16
    assert all(getattr(model.bottleneck, n).dtype == torch.float32 for n in names)
    assert torch.equal(model.bottleneck.codebook, updated)  # not rounded through bf16
    out = model(x.bfloat16())
    assert out.reconstruction.dtype == torch.bfloat16
    model.on_optimizer_step()
    assert model.bottleneck.codebook.dtype == torch.float32
    model.eval()  # the documented pipeline on a bf16 model: preprocess gives float32, encode/decode cope
    codes = model.encode(model.preprocess(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)))
    assert model.decode(codes.to(torch.uint16)).dtype == torch.bfloat16  # uint16: how a token store keeps codes


def test_gradient_accumulation_changes_the_codebook_once_per_step():
    torch.manual_seed(0)
    h1, h2 = torch.randn(2, 4, 4, 4), torch.randn(3, 4, 4, 4)
    micro, whole = quantizer(codebook_size=32, dim=4), quantizer(codebook_size=32, dim=4)
    whole.load_state_dict(micro.state_dict())
    start = micro.codebook.clone()
    micro(h1)
    micro(h2)
    assert torch.equal(micro.codebook, start)  # forward never changes the codebook
    micro.on_optimizer_step()
    whole(torch.cat([h1, h2]))
    whole.on_optimizer_step()
    assert not torch.equal(micro.codebook, start)
    torch.testing.assert_close(micro.codebook, whole.codebook, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(micro.ema_count, whole.ema_count)


def test_skipped_step_and_eval_mode_change_nothing():
    vq = quantizer(codebook_size=8, dim=2)
    start = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(1, 2, 4, 4))
    assert vq.on_optimizer_step(skipped=True) == {}
    vq.eval()(torch.randn(1, 2, 4, 4))
    assert vq.on_optimizer_step() == {}
    assert all(torch.equal(v, start[k]) for k, v in vq.state_dict().items())


# ---- against collapse ------------------------------------------------------------------------------------------------


def test_restarts_revive_unused_codes():
    vq = quantizer(codebook_size=16, dim=2, dead_threshold=0.25, decay=0.9)
    far = [[1000.0 + i, 1000.0] for i in range(8)]
    near = [[math.cos(a), math.sin(a)] for a in torch.linspace(0, 6.0, 8).tolist()]
    set_codebook(vq, near + far)
    data = lambda: torch.randn(256, 2)  # noqa: E731
    vq(as_features(data()))
    stats = vq.on_optimizer_step()
    assert stats["restarted"] == 8
    assert vq.codebook[8:].abs().max() < 10  # the far codes now sit on encoder outputs
    bias = 1 - 0.9
    threshold = torch.tensor(0.25 * 256 / 16)  # dead_threshold x expected count per code (256 vectors, 16 codes)
    torch.testing.assert_close(vq.ema_count[8:] / bias, threshold.expand(8))  # N^_k = threshold
    torch.testing.assert_close(vq.ema_sum[8:] / bias, threshold * vq.codebook[8:])  # m^_k = threshold * e_k
    for _ in range(20):
        vq(as_features(data()))
        vq.on_optimizer_step()
    assert vq.codebook_stats()["usage"] == 1.0
    assert vq.codebook_stats()["restarts_total"] >= 8


def test_kmeans_init_puts_codes_on_the_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]])
    data = centres.repeat_interleave(300, 0) + 0.3 * torch.randn(1200, 4, generator=g)
    vq = VectorQuantizer(VQConfig(codebook_size=8, dim=4, kmeans_samples=1000, kmeans_iters=10)).train()
    codebook_before = vq.codebook.clone()
    vq(as_features(data[torch.randperm(1200, generator=g)]))
    assert torch.equal(vq.codebook, codebook_before)  # nothing changes before the step hook
    assert vq.on_optimizer_step()["kmeans_samples"] == 1000
    assert bool(vq.initialized)
    to_centre = torch.cdist(vq.codebook, centres)
    assert to_centre.min(dim=1).values.max() < 1.0  # every code inside a cluster
    assert to_centre.min(dim=0).values.max() < 0.6  # every cluster has a code within 2 sigma of its centre


def test_l2_normalised_codes_stay_on_the_sphere():
    vq = quantizer(codebook_size=16, dim=3, l2_normalize=True, dead_threshold=0.1)
    for _ in range(3):
        out = vq(torch.randn(2, 3, 4, 4) * 7)
        vq.on_optimizer_step()
    torch.testing.assert_close(vq.codebook.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(out.z.norm(dim=1), torch.ones(2, 4, 4))


# ---- statistics and the tokenizer API --------------------------------------------------------------------------------


def test_perplexity_hand_cases():
    torch.testing.assert_close(perplexity(torch.ones(8)), torch.tensor(8.0))
    torch.testing.assert_close(perplexity(torch.tensor([5.0, 0, 0, 0])), torch.tensor(1.0))
    torch.testing.assert_close(perplexity(torch.tensor([1.0, 1.0, 2.0])), torch.tensor(math.exp(1.5 * math.log(2))))


def test_usage_window_counts_recently_used_codes():
    vq = quantizer(codebook_size=4, dim=1, usage_window=2)
    set_codebook(vq, [[0.0], [10.0], [20.0], [30.0]])
    for value in (0.0, 10.0, 20.0):
        vq(torch.full((1, 1, 1, 2), value))
        vq.on_optimizer_step()
    assert vq.codebook_stats()["usage"] == 0.5  # codes 1 and 2 in the last 2 steps


def test_tokenizer_encode_decode(vq_model, images):
    codes = vq_model.encode(images)
    assert codes.dtype == torch.long and codes.shape == (4, 8, 8)
    assert codes.min() >= 0 and codes.max() < vq_model.vocab_size
    torch.testing.assert_close(vq_model.decode(codes), vq_model(images).reconstruction)


@pytest.mark.parametrize(
    "codes, error, match",
    [
        (torch.zeros(1, 8, 8), TypeError, "integer tensor"),
        (torch.zeros(1, 64, dtype=torch.long), ValueError, r"\[B, h, w\]"),
        (torch.full((1, 8, 8), 32), ValueError, r"\[0, 32\)"),
        (torch.full((1, 8, 8), -1), ValueError, r"\[0, 32\)"),
    ],
)
def test_bad_codes_are_clear_errors(vq_model, codes, error, match):
    with pytest.raises(error, match=match):
        vq_model.decode(codes)


def test_an_empty_batch_encodes_to_empty_codes(vq_model, gaussian_model):
    """As the Gaussian path gives an empty posterior, an empty VQ batch gives empty codes (and decodes back)."""
    empty = torch.zeros(0, 3, 16, 16)
    codes = vq_model.encode(empty)
    assert codes.shape == (0, 8, 8) and codes.dtype == torch.long
    assert vq_model.decode(codes).shape == (0, 3, 16, 16)
    assert gaussian_model.encode(empty).mode().shape == (0, 4, 8, 8)
