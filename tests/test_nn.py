"""Encoder/decoder shapes, attention against a float64 reference, and clear errors on bad images."""

import math

import pytest
import torch

from tests.conftest import tiny_config
from vqtok import Autoencoder
from vqtok.config import GaussianConfig, VQConfig
from vqtok.nn import AttnBlock, Decoder, Encoder


@pytest.mark.parametrize("mult, f", [((1,), 1), ((1, 2), 2), ((1, 1, 2), 4)])
def test_encoder_decoder_shapes(mult, f):
    config = tiny_config(VQConfig(codebook_size=8, dim=4), channel_mult=mult, attn_resolutions=())
    enc, dec = Encoder(config, out_channels=5), Decoder(config, in_channels=5)
    x = torch.randn(2, 3, 16, 24)
    h = enc(x)
    assert h.shape == (2, 5, 16 // f, 24 // f)
    assert dec(h).shape == x.shape


def test_attention_placement_follows_resolution():
    config = tiny_config(VQConfig(codebook_size=8, dim=4), channel_mult=(1, 1, 2), attn_resolutions=(8,))
    enc, dec = Encoder(config, 4), Decoder(config, 4)
    has_attn = lambda level: any(isinstance(a, AttnBlock) for a in level.attns)  # noqa: E731
    assert [has_attn(level) for level in enc.levels] == [False, True, False]  # sizes 16, 8, 4
    assert [has_attn(level) for level in dec.levels] == [False, True, False]


def test_attention_matches_float64_softmax_reference():
    torch.manual_seed(0)
    block = AttnBlock(16, groups=4).double()
    x = torch.randn(2, 16, 5, 3, dtype=torch.float64)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (block.q, block.k, block.v))  # [B, HW, C]
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1)
    reference = x + block.proj((weights @ v).transpose(1, 2).reshape(2, 16, 5, 3))
    torch.testing.assert_close(block(x), reference, rtol=1e-10, atol=1e-10)


def test_large_maps_run_channels_last_with_the_values_of_nchw(monkeypatch):
    """From 64x64 up the CPU runs a level channels-last (a speed choice, `cpu_layout`): the values are those of the
    same modules run in NCHW, attention included, and what comes out is an ordinary contiguous tensor."""
    torch.manual_seed(0)
    config = tiny_config(GaussianConfig(dim=4), resolution=64, attn_resolutions=(64,))
    enc, dec = Encoder(config, out_channels=8).double(), Decoder(config, in_channels=8).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    seen = []  # whether the 64x64 levels' inputs (f = 2) are channels-last, call by call
    for level in (enc.levels[0], dec.levels[0]):
        level.register_forward_pre_hook(
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        h = enc(x)
        y = dec(h)
        assert seen == [True, True] and not x.is_contiguous(memory_format=torch.channels_last)
        assert h.is_contiguous() and y.is_contiguous()
        for module in ("blocks", "encoder", "decoder"):
            monkeypatch.setattr(f"vqtok.nn.{module}.cpu_layout", lambda t, scale=1: t)
        torch.testing.assert_close(h, enc(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, dec(h), rtol=1e-12, atol=1e-12)
    assert seen[2:] == [False, False]


@pytest.mark.parametrize("bottleneck", [VQConfig(codebook_size=8, dim=4), GaussianConfig(dim=4)])
def test_any_size_divisible_by_f_works(bottleneck):
    model = Autoencoder(tiny_config(bottleneck)).eval()
    for size in [(2, 2), (16, 16), (8, 30)]:
        x = torch.rand(1, 3, *size) * 2 - 1
        assert model(x).reconstruction.shape == x.shape


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.zeros(1, 1, 16, 16), ValueError, r"expected images \[B, 3, H, W\]"),
        (torch.zeros(3, 16, 16), ValueError, r"expected images \[B, 3, H, W\]"),
        (torch.zeros(1, 3, 15, 16), ValueError, "not divisible by the downsampling factor 2"),
        (torch.full((1, 3, 16, 16), float("nan")), ValueError, "NaN"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), TypeError, "use preprocess"),
    ],
)
def test_bad_images_are_clear_errors(vq_model, gaussian_model, x, error, match):
    for model in (vq_model, gaussian_model):
        with pytest.raises(error, match=match):
            model(x)
        with pytest.raises(error, match=match):
            model.encode(x)


@pytest.mark.parametrize("kind", ["tokenizer", "prior_learned", "prior_rotary"])
def test_gradient_free_entries_have_zero_gradient(kind):
    """The entries that run-equality tests exclude (tests/scripts/common.py) are exactly those whose gradient is zero
    in float64 - the attention key biases -, and no others: with rotary positions the prior's key bias is excluded
    from nothing, since there its gradient is real."""
    from tests.scripts.common import gradient_free_entries
    from vqtok.config import PriorConfig
    from vqtok.models import TransformerPrior

    torch.manual_seed(0)
    if kind == "tokenizer":
        model = Autoencoder(tiny_config(GaussianConfig(dim=4))).double().train()
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        out = model(x)
        loss = (out.reconstruction - x).pow(2).sum() + out.loss
    else:
        config = PriorConfig(vocab_size=11, grid=(3, 4), num_classes=3, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                             positions=kind.split("_")[1])
        model = TransformerPrior(config).double().train()
        for p in model.parameters():  # GPT-2 starts biases at 0; any values
            torch.nn.init.normal_(p, std=0.3)
        codes = torch.randint(0, 11, (3, 3, 4))
        logits = model(codes, torch.tensor([0, 1, 2]))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.reshape(-1))
    loss.backward()
    free = gradient_free_entries(model)
    assert free if kind != "prior_rotary" else not free
    for name, p in model.named_parameters():
        mask = free.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert (p.grad[mask].abs() <= 1e-12 * p.grad.abs().max().clamp(min=1)).all(), name  # zero where excluded
        assert (~mask).sum() == 0 or p.grad[~mask].abs().max() > 1e-6, name  # and every other weight learns
