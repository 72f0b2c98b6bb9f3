"""The VQ bottleneck's rotation trick (Fifty et al. 2024): the decoder gets the code exactly; the encoder gets
lambda R^T g. Checked against hand cases, against R built densely in float64 (the rotation itself: orthogonal, det
+1, e^ -> q^), against vector-quantize-pytorch's rotation trick run side by side, and for what it must not change:
the option off is today's straight-through gradient bit for bit, degenerate vectors stay finite, bf16 autocast,
backward memory, saving and loading."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import tiny_config
from vqtok import Autoencoder
from vqtok.bottleneck import VectorQuantizer
from vqtok.bottleneck.vq import _QuantizeWithCommitment
from vqtok.config import VQConfig, from_dict, to_dict


def as_features(z: torch.Tensor) -> torch.Tensor:
    """[N, D] vectors -> features [1, D, 1, N]; the quantizer sees the same N vectors in the same order."""
    return z.t()[None, :, None, :]


def as_rows(features: torch.Tensor) -> torch.Tensor:
    return features[0, :, 0, :].t()


def quantizer(**kw) -> VectorQuantizer:
    kw = {"kmeans_init": False, "dead_threshold": 0.0, "rotation_trick": True, **kw}
    return VectorQuantizer(VQConfig(**kw)).train()


def encoder_gradient(vq: VectorQuantizer, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output rows, d/dz of sum(out * g) + loss) for the vectors z [N, D] through the quantizer."""
    z = z.clone().requires_grad_()
    out = vq(as_features(z))
    ((out.z * as_features(g)).sum() + out.loss).backward()
    return as_rows(out.z).detach(), z.grad


def dense_rotation(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Fifty et al.'s R = I - 2 r r^T + 2 q^ e^^T for one pair of vectors, as a float64 D x D matrix."""
    e, q = e.double(), q.double()
    e_hat, q_hat = e / e.norm(), q / q.norm()
    r = (e_hat + q_hat) / (e_hat + q_hat).norm()
    return torch.eye(len(e), dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat)


def jacobian(e: torch.Tensor, q: torch.Tensor, *, unit: bool = False) -> torch.Tensor:
    """d out / d e of the quantizer's autograd function for one vector pair (in e's dtype), row by row: the
    gradient of out . u_k is J^T u_k, the k-th row of J."""
    d = len(e)
    h = e.reshape(1, d, 1, 1).expand(d, d, 1, 1).clone().requires_grad_()
    out, _ = _QuantizeWithCommitment.apply(h, q.reshape(1, d, 1, 1).expand(d, d, 1, 1), True, unit)
    (out * torch.eye(d, dtype=e.dtype).reshape(d, d, 1, 1)).sum().backward()
    return h.grad.reshape(d, d)


# ---- forward ------------------------------------------------------------------------------------------------------


def test_the_output_is_the_chosen_code_exactly():
    torch.manual_seed(0)
    vq = quantizer(codebook_size=64, dim=8)
    h = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = vq(h)
    assert torch.equal(out.z, vq.decode(out.codes))
    plain = quantizer(codebook_size=64, dim=8, rotation_trick=False)
    plain.load_state_dict(vq.state_dict())
    assert torch.equal(plain(h).z, out.z)


# ---- the gradient: hand cases, dense float64 reference, the peer ---------------------------------------------------


@pytest.mark.parametrize("e, q, g, expected", [
    # 90 degrees in the plane: R = [[0, -1], [1, 0]], lambda = 1/2, so grad = 1/2 R^T g
    ([2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -0.5]),
    ([2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.0]),
    # 45 degrees, lambda = sqrt 2: lambda R = [[1, -1], [1, 1]], grad = [[1, 1], [-1, 1]] g
    ([1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, -1.0]),
    ([1.0, 0.0], [1.0, 1.0], [0.3, 2.0], [2.3, 1.7]),
    # z-axis onto x-axis, y fixed: R^T = [[0, 0, -1], [0, 1, 0], [1, 0, 0]], lambda = 4/3
    ([0.0, 0.0, 3.0], [4.0, 0.0, 0.0], [1.0, 2.0, 3.0], [-4.0, 8 / 3, 4 / 3]),
    # e already on its code's direction: R = I, only the rescaling lambda = 2 remains
    ([1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [1.0, -2.0, 5.0], [2.0, -4.0, 10.0]),
])
def test_the_gradient_on_hand_cases(e, q, g, expected):
    """Vectors whose rotation is known by hand. The code set also holds a far-away decoy so there is a choice."""
    d = len(e)
    vq = quantizer(codebook_size=2, dim=d, beta=0.0)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([q, [-100.0] * d]))
    out, grad = encoder_gradient(vq, torch.tensor([e]), torch.tensor([g]))
    assert torch.equal(out, torch.tensor([q]))
    torch.testing.assert_close(grad, torch.tensor([expected]), atol=1e-6, rtol=1e-6)


def test_the_rotation_is_fifty_et_als_in_float64():
    """The function's Jacobian in float64, for random pairs in 2, 3 and 16 dimensions, is lambda R with R the dense
    closed form; R is orthogonal with det +1 and carries e^ onto q^ (and lambda R e = q)."""
    g = torch.Generator().manual_seed(0)
    for d in (2, 3, 16):
        for _ in range(5):
            e, q = torch.randn(d, generator=g, dtype=torch.float64), 3 * torch.randn(d, generator=g, dtype=torch.float64)
            lam = q.norm() / e.norm()
            r = jacobian(e, q) / lam
            torch.testing.assert_close(r, dense_rotation(e, q), atol=1e-12, rtol=0)
            torch.testing.assert_close(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
            torch.testing.assert_close(torch.linalg.det(r), torch.tensor(1.0, dtype=torch.float64))
            torch.testing.assert_close(r @ (e / e.norm()), q / q.norm(), atol=1e-12, rtol=0)
            torch.testing.assert_close(lam * r @ e, q, atol=1e-12, rtol=0)
    # on the sphere (l2_normalize), lambda is exactly 1
    e, q = torch.nn.functional.normalize(torch.randn(2, 5, generator=g, dtype=torch.float64), dim=1)
    torch.testing.assert_close(jacobian(e, q, unit=True), dense_rotation(e, q), atol=1e-12, rtol=0)


def test_the_quantizer_gradient_equals_the_dense_reference():
    """Through the whole quantizer in float32 (commitment included): lambda R^T g + beta 2 (z - q) / numel, with
    R dense in float64."""
    torch.manual_seed(0)
    vq = quantizer(codebook_size=16, dim=6, beta=0.25)
    z, g = torch.randn(40, 6) * 2, torch.randn(40, 6)
    out, grad = encoder_gradient(vq, z, g)
    expected = torch.stack([
        (q.norm() / e.norm()).double() * dense_rotation(e, q).T @ w.double() for e, q, w in zip(z, out, g)
    ]) + 0.25 * 2 * (z - out).double() / z.numel()
    torch.testing.assert_close(grad.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("d", [4, 64])
def test_the_gradient_equals_vector_quantize_pytorchs(d, l2):
    """The peer's VectorQuantize(rotation_trick=True) with vqtok's codebook, side by side on random vectors: the same
    codes, the same encoder gradient (the peer's output is the code only up to rounding; vqtok's exactly)."""
    VectorQuantize = pytest.importorskip("vector_quantize_pytorch").VectorQuantize
    torch.manual_seed(0)
    k, n = 32, 300
    vq = quantizer(codebook_size=k, dim=d, beta=0.0, l2_normalize=l2)
    peer = VectorQuantize(dim=d, codebook_size=k, commitment_weight=0.0, rotation_trick=True,
                          use_cosine_sim=l2).train()
    assert peer.rotation_trick
    with torch.no_grad():
        peer._codebook.embed.copy_(vq.codebook[None])
        peer._codebook.embed_avg.copy_(vq.codebook[None])
    z, g = torch.randn(n, d) * 1.5, torch.randn(n, d)
    out, grad = encoder_gradient(vq, z, g)
    x = z[None].clone().requires_grad_()
    peer_out, peer_codes, _ = peer(x)
    (peer_out * g[None]).sum().backward()
    assert torch.equal(peer_codes[0], vq.encode(as_features(z))[0, 0])
    torch.testing.assert_close(peer_out[0].detach(), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, x.grad[0], atol=1e-5, rtol=1e-4)
    assert (grad - g).abs().max() > 0.1, "the gradient is the straight-through one: nothing was compared"


# ---- what must not change, and the degenerate cases ----------------------------------------------------------------


@pytest.mark.parametrize("ema", [True, False])
def test_the_option_off_is_the_straight_through_gradient_bit_for_bit(ema):
    """rotation_trick false: the encoder's gradient is exactly (z - q) * (beta-weighted commitment scale) + g as the
    straight-through path computed it before the option existed, and a tokenizer's short run is unchanged."""
    torch.manual_seed(0)
    kw = {} if ema else {"ema": False, "codebook_weight": 1.0}
    vq = quantizer(codebook_size=16, dim=5, beta=0.25, rotation_trick=False, **kw)
    z, g = torch.randn(50, 5), torch.randn(50, 5)
    out, grad = encoder_gradient(vq, z, g)
    scale = torch.tensor(0.25) * (2.0 / z.numel())
    assert torch.equal(as_features(grad), torch.sub(as_features(z), as_features(out)).mul_(scale).add_(as_features(g)))
    rotated = quantizer(codebook_size=16, dim=5, beta=0.25, **kw)
    rotated.load_state_dict(vq.state_dict())
    assert not torch.equal(encoder_gradient(rotated, z, g)[1], grad)


def test_zero_vectors_get_the_straight_through_gradient():
    """e = 0, q = 0 and a vanishing e: R and lambda are undefined or overflow; the gradient is g there (finite)."""
    vq = quantizer(codebook_size=3, dim=3, beta=0.0)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [-9.0, 1.0, 0.0]]))
    z = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.1, 0.0], [1e-30, 0.0, 0.0], [4.0, 6.0, 5.0]])
    g = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0], [0.0, 7.0, 0.0], [1.0, 0.0, 0.0]])
    out, grad = encoder_gradient(vq, z, g)
    assert torch.equal(out[:3], torch.zeros(3, 3))  # q = 0 for the first three (the first is e = q = 0)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[:3], g[:3])
    assert not torch.allclose(grad[3], g[3])  # an ordinary vector beside them is rotated


def test_opposite_vectors_get_the_reflection_and_stay_finite():
    """e^ = -q^: R is not unique; the gradient is lambda (I - 2 e^ e^^T) g, the reflection that maps e^ onto q^ and
    that vector-quantize-pytorch also gives there."""
    e, q = torch.tensor([[3.0, 0.0, 4.0]]), torch.tensor([[-6.0, 0.0, -8.0]])
    vq = quantizer(codebook_size=2, dim=3, beta=0.0)
    with torch.no_grad():
        vq.codebook.copy_(torch.cat([q, torch.full((1, 3), 100.0)]))
    g = torch.tensor([[1.0, 2.0, -1.0]])
    _, grad = encoder_gradient(vq, e, g)
    e_hat = (e / e.norm())[0]
    expected = 2.0 * (torch.eye(3) - 2 * torch.outer(e_hat, e_hat)) @ g[0]
    torch.testing.assert_close(grad[0], expected)
    # and just off opposite (inside the ANTIPODAL band and just outside it): finite, and a rotation's size
    for tilt in (1e-4, 3e-2):
        _, grad = encoder_gradient(vq, e + torch.tensor([[0.0, tilt, 0.0]]), g)
        assert torch.isfinite(grad).all() and grad.norm() < 2.1 * g.norm()


def test_bf16_autocast_is_finite_and_close_to_float32():
    """Under bf16 autocast the rotation is computed in float32: float32 features get the float32 gradient (to
    rounding), bf16 features that gradient rounded to bf16."""
    torch.manual_seed(0)
    vq = quantizer(codebook_size=64, dim=8, beta=0.25)
    h = torch.randn(2, 8, 6, 6).bfloat16()
    weight = torch.randn(2, 8, 6, 6)
    grads = {}
    for name, dtype, autocast in [("fp32", torch.float32, False), ("fp32 autocast", torch.float32, True),
                                  ("bf16 autocast", torch.bfloat16, True)]:
        x = h.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = vq(x)
            loss = (out.z.float() * weight).sum() + out.loss
        loss.backward()
        assert x.grad.dtype == dtype
        grads[name] = x.grad.float()
    assert torch.isfinite(grads["bf16 autocast"]).all()
    torch.testing.assert_close(grads["fp32 autocast"], grads["fp32"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads["bf16 autocast"], grads["fp32"], atol=1e-2, rtol=8e-3)
    assert (grads["fp32"] - weight).abs().max() > 0.1  # rotated, not straight through


class _BigAllocations(TorchDispatchMode):
    """Counts the op outputs with at least `numel` elements (new tensors, not in-place results or out= buffers)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inplace = func._schema.name.endswith("_") or "out" in kwargs
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and not inplace:
                self.count += 1
        return result


@pytest.mark.parametrize("rotation", [False, True])
def test_backward_makes_one_n_by_d_buffer(rotation):
    """The rotated backward allocates what the straight-through one does: the gradient's N x D buffer, nothing
    else that large (the dot products go through it before it holds the gradient)."""
    h = torch.randn(2, 16, 8, 8, requires_grad=True)
    q = torch.randn(2, 16, 8, 8)
    out, commitment = _QuantizeWithCommitment.apply(h, q, rotation, False)
    grads = torch.randn_like(out), torch.tensor(0.5)
    counter = _BigAllocations(h.numel())
    with counter:
        (grad,) = torch.autograd.grad((out, commitment), h, grads)
    assert counter.count == 1
    assert grad.shape == h.shape and grad.stride() == h.stride()


# ---- the tokenizer, saving and loading -----------------------------------------------------------------------------


def test_a_tokenizer_with_the_rotation_trick_trains_saves_and_loads(tmp_path, images):
    torch.manual_seed(0)
    model = Autoencoder(tiny_config(VQConfig(codebook_size=32, dim=4, kmeans_init=False, rotation_trick=True))).train()
    (model(images).reconstruction - images).pow(2).mean().backward()
    grads = [p.grad for name, p in model.named_parameters() if name.startswith("encoder")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path / "rot")
    saved = json.loads((tmp_path / "rot" / "config.json").read_text())
    assert saved["bottleneck"]["rotation_trick"] is True
    loaded = Autoencoder.from_pretrained(tmp_path / "rot")
    assert loaded.config.bottleneck.rotation_trick is True
    assert loaded.config == model.config


def test_an_old_config_without_the_key_loads_with_the_option_off(tmp_path, vq_model):
    vq_model.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    saved = json.loads(path.read_text())
    del saved["bottleneck"]["rotation_trick"]
    path.write_text(json.dumps(saved))
    assert Autoencoder.from_pretrained(tmp_path / "old").config.bottleneck.rotation_trick is False


def test_the_config_key_round_trips_and_is_strict():
    config = VQConfig(rotation_trick=True)
    assert from_dict(VQConfig, to_dict(config)) == config
    assert from_dict(VQConfig, {"kind": "vq"}).rotation_trick is False
    with pytest.raises(Exception, match="rotation_trick"):
        from_dict(VQConfig, {"kind": "vq", "rotation_trick": "yes"})

