"""vqtok.pretrained against independent references: diffusers' own AutoencoderKL / VQModel (and its LDM converter),
LDM/taming and LlamaGen state dicts whose names are written out here by hand, and a float64 brute-force search.

Every model is tiny and random, perturbed away from its initialisation so that each tensor matters; the same float32
images go through vqtok and through the reference, and outputs agree to 1e-4 (codes exactly).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, VQModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

import vqtok  # noqa: E402
from vqtok.config import ConfigError  # noqa: E402
from vqtok.hub import weights_sha256  # noqa: E402
from vqtok.pretrained import convert  # noqa: E402
from vqtok.pretrained.configs import DIFFUSERS_DEFAULTS  # noqa: E402

TOL = 1e-4
DOWN, ATTN_DOWN, UP, ATTN_UP = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"


def images(seed: int, size: int | tuple[int, int] = 32, n: int = 2) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initialisation (GroupNorm's ones and zeros, the codebook's tiny uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def one_line(excinfo: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(excinfo.value), str(excinfo.value)


# --------------------------------------------------------------------------------------------------------------
# diffusers folders, through an offline Hub cache

DIFFUSERS_CONFIGS = {
    # (a) Stable Diffusion's VAE, small: 4 latent channels, f4, two blocks a level, mid attention
    "sd": (AutoencoderKL, dict(block_out_channels=(16, 32, 32), down_block_types=(DOWN,) * 3, up_block_types=(UP,) * 3,
                               layers_per_block=2, latent_channels=4, norm_num_groups=8, sample_size=32)),
    # (b) SD3 / FLUX: 16 latent channels, no quant convs, a shift factor
    "flux": (AutoencoderKL, dict(block_out_channels=(16, 32), down_block_types=(DOWN,) * 2, up_block_types=(UP,) * 2,
                                 layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=32,
                                 use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                                 shift_factor=0.1159, force_upcast=False)),
    # (c) taming's VQGAN f16: attention only at the lowest resolution (diffusers' up_blocks[0]), code dim != latent
    "vqgan": (VQModel, dict(block_out_channels=(16, 16, 32, 32, 32), down_block_types=(DOWN,) * 4 + (ATTN_DOWN,),
                            up_block_types=(ATTN_UP,) + (UP,) * 4, layers_per_block=1, latent_channels=8,
                            vq_embed_dim=4, num_vq_embeddings=48, norm_num_groups=8, sample_size=64)),
    # (d) no mid-block attention (and a KL model with level attention)
    "no_mid_attn": (AutoencoderKL, dict(block_out_channels=(16, 32), down_block_types=(DOWN, ATTN_DOWN),
                                        up_block_types=(ATTN_UP, UP), layers_per_block=1, latent_channels=4,
                                        norm_num_groups=16, sample_size=256, mid_block_add_attention=False,
                                        scaling_factor=0.5)),
}
# Images need not have the config's sample_size (which only places attention), nor be square
IMAGE_SIZES = {"sd": (32, 32), "flux": (32, 48), "vqgan": (64, 64), "no_mid_attn": (24, 40)}


def diffusers_model(name: str, seed: int = 0) -> torch.nn.Module:
    cls, cfg = DIFFUSERS_CONFIGS[name]
    torch.manual_seed(seed)
    model = perturb(cls(**cfg), seed)
    if cls is VQModel:  # a codebook at the features' scale, so that codes spread over it
        with torch.no_grad():
            x = images(seed + 1, IMAGE_SIZES[name], n=4)
            h = model.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, cfg["vq_embed_dim"])
            g = torch.Generator().manual_seed(seed)
            model.quantize.embedding.weight.copy_(torch.randn(cfg["num_vq_embeddings"], h.shape[1], generator=g)
                                                  * h.std(0) + h.mean(0))
    return model


@pytest.fixture(scope="module")
def diffusers_folders(tmp_path_factory):
    """Saved diffusers folders (config.json + diffusion_pytorch_model.safetensors), built once, with their models."""
    root = tmp_path_factory.mktemp("diffusers")
    cache = {}

    def get(name: str):
        if name not in cache:
            model = diffusers_model(name)
            model.save_pretrained(root / name, safe_serialization=True)
            cache[name] = (model, root / name)
        return cache[name]

    return get


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache, offline: `publish(repo_id, folder, sha)` lays a folder out as huggingface_hub does."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # (read from the environment at import)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def publish(repo_id: str, folder: Path, sha: str) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / sha)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(sha)

    return publish


def check_against_diffusers(tok, ref, x: torch.Tensor) -> None:
    """vqtok's encode/decode against diffusers' on the same images: posterior or codes, and the decoded images."""
    with torch.no_grad():
        if isinstance(ref, AutoencoderKL):
            posterior, expected = tok.encode(x), ref.encode(x).latent_dist
            assert max_err(posterior.mean, expected.mean) <= TOL
            assert max_err(posterior.std, expected.std) <= TOL
            z = expected.mean + 0.5 * torch.randn(expected.mean.shape, generator=torch.Generator().manual_seed(3))
            decoded = ref.decode(z).sample
            assert max_err(tok.decode(z), decoded) <= TOL
        else:
            codes = tok.encode(x)
            h = ref.encode(x).latents
            expected = ref.quantize(h)[2][2].view(codes.shape)
            assert torch.equal(codes, expected)
            assert codes.unique().numel() > 4  # codes that say something
            b, d, height, width = h.shape
            zq = ref.quantize.get_codebook_entry(codes.flatten(), (b, height, width, d))
            decoded = ref.decode(zq, force_not_quantize=True).sample
            assert max_err(tok.decode(codes), decoded) <= TOL
        assert decoded.std() > 0.05  # not a constant image


@pytest.mark.parametrize("name", list(DIFFUSERS_CONFIGS))
def test_diffusers_repo_from_offline_hub_cache(name, diffusers_folders, offline_hub):
    ref, folder = diffusers_folders(name)
    cls, cfg = DIFFUSERS_CONFIGS[name]
    sha = f"{list(DIFFUSERS_CONFIGS).index(name) + 1:x}" * 40
    offline_hub(f"org/{name}", folder, sha)
    tok = vqtok.load(f"org/{name}")
    check_against_diffusers(tok, ref, images(11, IMAGE_SIZES[name]))

    assert tok.loaded_from.source == f"org/{name}" and tok.loaded_from.commit == sha
    origin = tok.config.converted_from
    assert (origin.format, origin.source, origin.revision, origin.class_name) == ("diffusers", f"org/{name}", sha,
                                                                                   cls.__name__)
    assert origin.weights_sha256 == hashlib.sha256((folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    c = tok.config
    assert c.scaling_factor == pytest.approx(ref.config.scaling_factor)
    assert c.shift_factor == pytest.approx(ref.config.get("shift_factor") or 0.0)
    assert c.force_upcast == ref.config.force_upcast
    assert c.mid_attention == ref.config.mid_block_add_attention
    if cls is AutoencoderKL:
        assert c.use_quant_conv == ref.config.use_quant_conv
        # encode gives the raw latents (compared above); scale_latents is where the normalisation happens
        z = torch.randn(1, cfg["latent_channels"], 4, 4)
        scaled = (z - (ref.config.shift_factor or 0.0)) * ref.config.scaling_factor
        assert max_err(tok.scale_latents(z), scaled) <= 1e-6
        assert max_err(tok.unscale_latents(scaled), z) <= 1e-5


def test_diffusers_pipeline_vae_subfolder_from_offline_hub_cache(diffusers_folders, offline_hub, tmp_path):
    """A Stable Diffusion pipeline repo: its VAE in vae/ (the commit found two levels up); a VAE repo's model card
    licence is recorded."""
    ref, folder = diffusers_folders("sd")
    pipe = tmp_path / "pipe"
    shutil.copytree(folder, pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (pipe / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# A pipeline\n")
    sha = "0123456789abcdef" * 2 + "01234567"
    offline_hub("org/pipe", pipe, sha)
    tok = vqtok.load("org/pipe", subfolder="vae")
    assert (tok.loaded_from.source, tok.loaded_from.commit, tok.loaded_from.subfolder) == ("org/pipe", sha, "vae")
    origin = tok.config.converted_from
    assert (origin.source, origin.revision, origin.class_name) == ("org/pipe", sha, "AutoencoderKL")
    check_against_diffusers(tok, ref, images(14))

    vae = tmp_path / "vae"  # a VAE repo of its own, with a model card
    shutil.copytree(folder, vae)
    (vae / "README.md").write_text("---\nlicense: mit\n---\n# A VAE\n")
    offline_hub("org/vae", vae, "f" * 40)
    assert vqtok.load("org/vae").config.converted_from.license == "mit"


def test_flags_recorded(diffusers_folders):
    """force_upcast and the factors come from config.json, not from vqtok's defaults."""
    _, folder = diffusers_folders("sd")
    assert vqtok.load(folder).config.force_upcast is True  # AutoencoderKL's default, written by save_pretrained
    _, folder = diffusers_folders("flux")
    tok = vqtok.load(folder)
    assert (tok.config.force_upcast, tok.config.shift_factor, tok.config.scaling_factor) == (False, 0.1159, 0.3611)
    assert tok.config.use_quant_conv is False and tok.config.use_post_quant_conv is False


LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def test_diffusers_legacy_attention_names(diffusers_folders, tmp_path):
    """Files saved before diffusers 0.14 name the attention projections query/key/value/proj_attn."""
    ref, folder = diffusers_folders("sd")
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    tensors = load_file(legacy / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        for new, old in LEGACY_ATTENTION.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[name] = t
    assert sum(n.endswith(".query.weight") for n in renamed) == 2  # the encoder's and the decoder's mid attention
    assert not any(".to_q." in n for n in renamed)
    save_file(renamed, legacy / "diffusion_pytorch_model.safetensors")
    check_against_diffusers(vqtok.load(legacy), ref, images(12))


@pytest.mark.parametrize("cls", [AutoencoderKL, VQModel])
def test_diffusers_defaults_are_diffusers(cls):
    """A config.json that leaves a key out means diffusers' default: vqtok's table of them must be diffusers'."""
    signature = inspect.signature(cls.__init__)
    installed = {name: p.default for name, p in signature.parameters.items() if name != "self"}
    installed = {k: list(v) if isinstance(v, tuple) else v for k, v in installed.items()}
    assert DIFFUSERS_DEFAULTS[cls.__name__] == installed


def test_diffusers_config_with_omitted_keys(diffusers_folders, tmp_path):
    """The keys equal to diffusers' defaults dropped from config.json: still the same model."""
    ref, folder = diffusers_folders("no_mid_attn")
    short = tmp_path / "short"
    shutil.copytree(folder, short)
    raw = json.loads((short / "config.json").read_text())
    defaults = inspect.signature(AutoencoderKL.__init__).parameters
    dropped = [k for k in list(raw) if k in defaults and (list(d) if isinstance(d := defaults[k].default, tuple)
                                                            else d) == raw[k]]
    assert {"act_fn", "in_channels", "use_quant_conv", "force_upcast"} <= set(dropped)
    (short / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k not in dropped}))
    tok = vqtok.load(short)
    assert tok.config.force_upcast is True
    check_against_diffusers(tok, ref, images(13))


# --------------------------------------------------------------------------------------------------------------
# LDM / taming layout: names generated here from a ddconfig, converted by vqtok and by diffusers' own converter

LDM_KL = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
LDM_VQ = dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2],
              num_res_blocks=1, attn_resolutions=[8], dropout=0.0)  # attention at the lowest level, as VQGAN's


def ldm_shapes(dd: dict, embed_dim: int, n_embed: int | None = None) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of taming's / LDM's Encoder, Decoder and first-stage model for `dd`."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    def mid(part, c):
        resnet(f"{part}.mid.block_1", c, c)
        attn(f"{part}.mid.attn_1", c)
        resnet(f"{part}.mid.block_2", c, c)

    ch, mult, blocks, z, n = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"], len(dd["ch_mult"])
    attn_at = set(dd["attn_resolutions"])
    conv("encoder.conv_in", dd["in_channels"], ch, 3)
    size, width = dd["resolution"], ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", width, ch * m)
            width = ch * m
            if size in attn_at:
                attn(f"encoder.down.{i}.attn.{j}", width)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", width, width, 3)
            size //= 2
    mid("encoder", width)
    norm("encoder.norm_out", width)
    conv("encoder.conv_out", width, 2 * z if dd["double_z"] else z, 3)

    width = ch * mult[-1]
    conv("decoder.conv_in", z, width, 3)
    mid("decoder", width)
    for i in reversed(range(n)):  # decoder.up.{i}: the resolution level i, built from the bottom
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", width, ch * mult[i])
            width = ch * mult[i]
            if size in attn_at:
                attn(f"decoder.up.{i}.attn.{j}", width)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", width, width, 3)
            size *= 2
    norm("decoder.norm_out", width)
    conv("decoder.conv_out", width, dd["out_ch"], 3)
    if dd["double_z"]:
        conv("quant_conv", 2 * z, 2 * embed_dim, 1)
    else:
        conv("quant_conv", z, embed_dim, 1)
    conv("post_quant_conv", embed_dim, z, 1)
    if n_embed is not None:
        shapes["quantize.embedding.weight"] = (n_embed, embed_dim)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random weights at a sensible scale: convolutions ~ 1/sqrt(fan_in), norms near (1, 0), unit-scale codebook."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in sorted(shapes.items()):
        t = torch.randn(shape, generator=g)
        if len(shape) == 4:
            t = t / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif ".norm" in name and name.endswith(".weight"):
            t = 1 + 0.1 * t
        elif len(shape) == 1:
            t = 0.05 * t
        sd[name] = t
    return sd


def diffusers_cfg(dd: dict, **extra) -> dict:
    """The diffusers config of an LDM ddconfig (level i has attention when its size is in attn_resolutions)."""
    n = len(dd["ch_mult"])
    attn = [dd["resolution"] // 2**i in dd["attn_resolutions"] for i in range(n)]
    return dict(in_channels=dd["in_channels"], out_channels=dd["out_ch"],
                down_block_types=[ATTN_DOWN if a else DOWN for a in attn],
                up_block_types=[ATTN_UP if a else UP for a in reversed(attn)],
                block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
                latent_channels=dd["z_channels"], norm_num_groups=32, sample_size=dd["resolution"], **extra)


def ldm_level_attention_to_diffusers(sd: dict, levels: int) -> dict:
    """What convert_ldm_vae_checkpoint leaves under LDM names (it maps only the mid block's attention): level
    attention, renamed here by hand; 1x1 convolutions -> Linear weights."""
    out = {}
    for name, t in sd.items():
        m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)", name)
        if m is None:
            out[name] = t
            continue
        part, _, level, j, what, kind = m.groups()
        block = f"down_blocks.{level}" if part == "encoder" else f"up_blocks.{levels - 1 - int(level)}"
        what = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[what]
        out[f"{part}.{block}.attentions.{j}.{what}.{kind}"] = t[:, :, 0, 0] if t.ndim == 4 else t
    return out


def taming_yaml(path: Path, dd: dict, embed_dim: int, n_embed: int | None = None, target: str | None = None) -> Path:
    params = {"embed_dim": embed_dim, "ddconfig": dd, "lossconfig": {"target": "torch.nn.Identity"}}
    if n_embed is not None:
        params["n_embed"] = n_embed
    target = target or ("taming.models.vqgan.VQModel" if n_embed else "ldm.models.autoencoder.AutoencoderKL")
    path.write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}}))
    return path


@pytest.fixture(scope="module")
def ldm_kl(tmp_path_factory):
    """An LDM KL first stage as a Lightning .ckpt (with a discriminator tensor and global_step) and inside a whole
    latent-diffusion .safetensors (first_stage_model. prefix, diffusion model tensors), its YAML, and diffusers'
    own conversion of it."""
    root = tmp_path_factory.mktemp("ldm_kl")
    sd = random_state(ldm_shapes(LDM_KL, embed_dim=4), seed=21)
    ckpt = root / "kl.ckpt"
    torch.save({"state_dict": {**sd, "loss.discriminator.x": torch.ones(3)}, "global_step": 1234}, ckpt)
    whole = {f"first_stage_model.{k}": v for k, v in sd.items()}
    whole.update({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
                  "model.diffusion_model.out.2.bias": torch.zeros(4)})
    st = root / "sd.safetensors"
    save_file(whole, st)
    ref = AutoencoderKL(**diffusers_cfg(LDM_KL))
    ref.load_state_dict(convert_ldm_vae_checkpoint(whole, diffusers_cfg(LDM_KL)), strict=True)
    ldm_yaml = root / "ldm.yaml"
    ldm_yaml.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": 4, "ddconfig": LDM_KL,
                                          "lossconfig": {"target": "torch.nn.Identity"}}}}}}))
    return dict(sd=sd, ckpt=ckpt, st=st, yaml=taming_yaml(root / "kl.yaml", LDM_KL, 4), ldm_yaml=ldm_yaml,
                ref=ref.eval())


@pytest.fixture(scope="module")
def ldm_vq(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm_vq")
    sd = random_state(ldm_shapes(LDM_VQ, embed_dim=4, n_embed=32), seed=22)
    ckpt = root / "vq.ckpt"
    torch.save({"state_dict": {**sd, "loss.discriminator.main.0.weight": torch.ones(2, 3, 4, 4)}, "global_step": 7},
               ckpt)
    cfg = diffusers_cfg(LDM_VQ, vq_embed_dim=4, num_vq_embeddings=32)
    converted = convert_ldm_vae_checkpoint(sd, cfg)
    ref = VQModel(**cfg)
    expected = set(ref.state_dict())
    # diffusers' converter (0.42) maps the encoder/decoder but for the attention inside the levels, which it leaves
    # under LDM names, and knows no codebook: those are renamed here by hand
    left = sorted(set(converted) - expected)
    assert all(re.search(r"\.(down|up)\.\d+\.attn\.", n) for n in left), left
    by_hand = ldm_level_attention_to_diffusers(converted, len(LDM_VQ["ch_mult"]))
    by_hand["quantize.embedding.weight"] = sd["quantize.embedding.weight"]
    ref.load_state_dict(by_hand, strict=True)
    return dict(sd=sd, ckpt=ckpt, yaml=taming_yaml(root / "vq.yaml", LDM_VQ, 4, 32), ref=ref.eval())


@pytest.mark.parametrize("how", ["yaml", "latent_diffusion_yaml", "mapping", "shapes"])
def test_ldm_kl_against_diffusers_converter(ldm_kl, how):
    config = {"yaml": ldm_kl["yaml"], "latent_diffusion_yaml": ldm_kl["ldm_yaml"], "shapes": None,
              "mapping": {"embed_dim": 4, **LDM_KL}}[how]
    source = ldm_kl["st"] if how == "latent_diffusion_yaml" else ldm_kl["ckpt"]
    tok = convert(source, config=config)
    assert tok.config.converted_from.format == "ldm"
    assert tok.config.converted_from.source == str(Path(source).resolve())
    assert tok.config.force_upcast is False and tok.config.scaling_factor == 1.0  # a file records neither
    check_against_diffusers(tok, ldm_kl["ref"], images(31))


def test_ldm_whole_checkpoint_from_shapes(ldm_kl):
    """The .safetensors of a whole latent diffusion model: its first stage, the rest set aside."""
    tok = convert(ldm_kl["st"])
    check_against_diffusers(tok, ldm_kl["ref"], images(32))


@pytest.mark.parametrize("how", ["yaml", "shapes"])
def test_ldm_vq_against_diffusers(ldm_vq, how):
    tok = convert(ldm_vq["ckpt"], config=ldm_vq["yaml"] if how == "yaml" else None)
    assert tok.config.bottleneck.l2_normalize is False
    assert tok.config.attn_resolutions == ((8,) if how == "yaml" else (64,))  # level 2 of 32 px, or of 256 px
    check_against_diffusers(tok, ldm_vq["ref"], images(33))


def test_ldm_without_quant_convs(tmp_path):
    """FLUX's ae.safetensors: LDM names, no quant_conv / post_quant_conv, the latent normalisation given by hand."""
    dd = {**LDM_KL, "z_channels": 16, "ch_mult": [1, 2]}
    sd = random_state({k: v for k, v in ldm_shapes(dd, embed_dim=16).items() if "quant_conv" not in k}, seed=23)
    path = tmp_path / "ae.safetensors"
    save_file(sd, path)
    cfg = diffusers_cfg(dd, use_quant_conv=False, use_post_quant_conv=False)
    ref = AutoencoderKL(**cfg)
    ref.load_state_dict(convert_ldm_vae_checkpoint(sd, cfg), strict=True)
    tok = convert(path, scaling_factor=0.3611, shift_factor=0.1159)
    c = tok.config
    assert (c.use_quant_conv, c.use_post_quant_conv, c.scaling_factor, c.shift_factor) == (False, False, 0.3611, 0.1159)
    check_against_diffusers(tok, ref.eval(), images(34, (32, 24)))


# --------------------------------------------------------------------------------------------------------------
# LlamaGen layout: a diffusers VQModel of LlamaGen's architecture, renamed here to LlamaGen's names

LLAMAGEN_ARGS = dict(codebook_size=40, codebook_embed_dim=4, codebook_l2_norm=True, encoder_ch_mult=[1, 2],
                     decoder_ch_mult=[1, 2], z_channels=8, ch=32, num_res_blocks=1)


def llamagen_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers VQModel names -> LlamaGen's VQModel names (both count the decoder's blocks from the bottom)."""
    out = {}
    for name, t in sd.items():
        new = name
        for pattern, repl in (
            (r"^(encoder)\.down_blocks\.(\d+)\.resnets\.", r"\1.conv_blocks.\2.res."),
            (r"^(decoder)\.up_blocks\.(\d+)\.resnets\.", r"\1.conv_blocks.\2.res."),
            (r"^(encoder)\.down_blocks\.(\d+)\.attentions\.", r"\1.conv_blocks.\2.attn."),
            (r"^(decoder)\.up_blocks\.(\d+)\.attentions\.", r"\1.conv_blocks.\2.attn."),
            (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.conv_blocks.\1.downsample."),
            (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.conv_blocks.\1.upsample."),
            (r"\.mid_block\.resnets\.0\.", ".mid.0."),
            (r"\.mid_block\.attentions\.0\.", ".mid.1."),
            (r"\.mid_block\.resnets\.1\.", ".mid.2."),
            (r"\.conv_shortcut\.", ".nin_shortcut."),
            (r"\.conv_norm_out\.", ".norm_out."),
            (r"\.group_norm\.", ".norm."),
            (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".proj_out."),
        ):
            new = re.sub(pattern, repl, new)
        if re.search(r"\.(q|k|v|proj_out)\.weight$", new):
            t = t[:, :, None, None]  # LlamaGen's attention projections are 1x1 convolutions
        out[new] = t.clone()
    return out


@pytest.fixture(scope="module")
def llamagen(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamagen")
    a = LLAMAGEN_ARGS
    torch.manual_seed(41)
    ref = perturb(VQModel(block_out_channels=[a["ch"] * m for m in a["encoder_ch_mult"]],
                          down_block_types=(DOWN, ATTN_DOWN), up_block_types=(ATTN_UP, UP),
                          layers_per_block=a["num_res_blocks"], latent_channels=a["z_channels"],
                          vq_embed_dim=a["codebook_embed_dim"], num_vq_embeddings=a["codebook_size"],
                          norm_num_groups=32), seed=41)
    with torch.no_grad():
        ref.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(42))
    sd = llamagen_names(ref.state_dict())
    assert "encoder.conv_blocks.1.attn.0.q.weight" in sd and "decoder.conv_blocks.0.attn.1.proj_out.weight" in sd
    assert "decoder.conv_blocks.0.upsample.conv.weight" in sd and "decoder.mid.1.norm.weight" in sd
    sd["quantize.codebook_used"] = torch.zeros(65536)
    pt = root / "vq_ds2_c2i.pt"
    torch.save({"model": sd}, pt)
    folder = root / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(a))
    save_file(sd, folder / "model.safetensors")
    return dict(ref=ref.eval(), pt=pt, folder=folder, sd=sd)


def check_against_llamagen(tok, ref, x: torch.Tensor) -> None:
    with torch.no_grad():
        codes = tok.encode(x)
        h = ref.encode(x).latents.double()  # quant_conv(encoder(x))
        z = F.normalize(h.permute(0, 2, 3, 1), dim=-1)
        codebook = F.normalize(ref.quantize.embedding.weight.double(), dim=1)
        expected = ((z[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)
        assert torch.equal(codes, expected)
        assert codes.unique().numel() > 8
        zq = F.normalize(ref.quantize.embedding.weight, dim=1)[codes].permute(0, 3, 1, 2)
        decoded = ref.decoder(ref.post_quant_conv(zq))
        assert max_err(tok.decode(codes), decoded) <= TOL
        assert decoded.std() > 0.05


@pytest.mark.parametrize("how", ["folder", "pt_args", "pt_shapes"])
def test_llamagen_against_brute_force(llamagen, how):
    if how == "folder":
        tok = vqtok.load(llamagen["folder"])
    else:
        tok = convert(llamagen["pt"], config=LLAMAGEN_ARGS if how == "pt_args" else None)
    assert tok.config.converted_from.format == "llamagen"
    assert tok.config.bottleneck.l2_normalize is True
    check_against_llamagen(tok, llamagen["ref"], images(51))


# --------------------------------------------------------------------------------------------------------------
# Refusals: one line, naming the problem


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_refuses_pickle_that_would_run_code(ldm_kl, tmp_path, zip_format):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": ldm_kl["sd"], "callback": RunsACommand(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match=r"needs (posix|os)\.system.*will not run it") as e:
        convert(path, config=ldm_kl["yaml"])
    one_line(e)
    assert not marker.exists()


def test_refuses_pickle_with_a_namespace(llamagen, tmp_path):
    path = tmp_path / "args.pt"
    torch.save({"model": llamagen["sd"], "args": argparse.Namespace(vq_model="VQ-16")}, path)
    with pytest.raises(ValueError, match=r"needs argparse\.Namespace") as e:
        convert(path)
    one_line(e)


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "config"])
def test_refuses_weights_that_do_not_match(ldm_kl, tmp_path, change):
    sd = dict(ldm_kl["sd"])
    config = {"embed_dim": 4, **LDM_KL}
    if change == "missing":
        del sd["decoder.up.0.block.1.conv2.weight"]
        match = r"missing 1 tensor\(s\): decoder\.up\.0\.block\.1\.conv2\.weight"
    elif change == "extra":
        sd["encoder.down.0.block.0.extra.weight"] = torch.zeros(2)
        match = r"unexpected 1 tensor\(s\): encoder\.down\.0\.block\.0\.extra\.weight"
    elif change == "shape":
        sd["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
        match = r"'decoder\.conv_out\.weight' has shape \(3, 32, 1, 1\), the config gives \(3, 32, 3, 3\)"
    else:
        config["embed_dim"] = 3
        match = r"'quant_conv\.weight' has shape \(8, 8, 1, 1\), the config gives \(6, 8, 1, 1\)"
    path = tmp_path / "first_stage.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match=match) as e:
        convert(path, config=config)
    one_line(e)


@pytest.mark.parametrize("edit, match", [
    ({"act_fn": "gelu"}, r"'act_fn' is 'gelu'"),
    ({"flash_attention": True}, r"field\(s\) 'flash_attention' are not understood"),
    ({"up_block_types": [UP, ATTN_UP]}, r"attention at levels \[1\] but up_block_types at \[0\]"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, r"'latents_mean' is set"),
    ({"_class_name": "AutoencoderTiny"}, r"'AutoencoderTiny'"),
])
def test_refuses_diffusers_config(diffusers_folders, tmp_path, edit, match):
    _, folder = diffusers_folders("no_mid_attn")  # attention at level 1: down_blocks[1], up_blocks[0]
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    raw = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**raw, **edit}))
    with pytest.raises(ConfigError, match=match) as e:
        vqtok.load(edited)
    one_line(e)


def test_refuses_spatial_norm(diffusers_folders, tmp_path):
    _, folder = diffusers_folders("vqgan")
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    raw = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**raw, "norm_type": "spatial"}))
    with pytest.raises(ConfigError, match=r"'norm_type' is 'spatial'") as e:
        vqtok.load(edited)
    one_line(e)


def test_refuses_factors_for_a_diffusers_folder(diffusers_folders):
    _, folder = diffusers_folders("sd")
    with pytest.raises(ValueError, match=r"sets scaling_factor and shift_factor itself") as e:
        convert(folder, scaling_factor=1.0)
    one_line(e)


def test_refuses_gumbel(ldm_vq, tmp_path):
    path = taming_yaml(tmp_path / "gumbel.yaml", LDM_VQ, 4, 32, target="taming.models.vqgan.GumbelVQ")
    with pytest.raises(ConfigError, match=r"GumbelVQ \(Gumbel quantization\)") as e:
        convert(ldm_vq["ckpt"], config=path)
    one_line(e)


@pytest.mark.parametrize("fmt", ["llamagen", "diffusers"])
def test_refuses_format_that_is_not_the_names(ldm_vq, fmt):
    with pytest.raises(ValueError, match=rf"tensor names are ldm's, not {fmt}'s") as e:
        convert(ldm_vq["ckpt"], format=fmt)
    one_line(e)


# --------------------------------------------------------------------------------------------------------------
# Determinism


def test_converting_twice_gives_the_same_weights(ldm_vq, llamagen, diffusers_folders):
    torch.manual_seed(1)
    first = convert(ldm_vq["ckpt"])
    torch.manual_seed(2)  # whatever the caller's RNG holds
    second = convert(ldm_vq["ckpt"])
    assert weights_sha256(first) == weights_sha256(second)
    assert weights_sha256(convert(llamagen["pt"])) == weights_sha256(vqtok.load(llamagen["folder"]))
    _, folder = diffusers_folders("vqgan")
    assert weights_sha256(vqtok.load(folder)) == weights_sha256(vqtok.load(folder))


def test_force_upcast_runs_float32_under_autocast(diffusers_folders):
    """The SD VAE's force_upcast: under bf16 autocast the model computes in float32 (the same numbers as without
    autocast); without the flag autocast is honoured (bf16 results, measurably different)."""
    _, folder = diffusers_folders("sd")
    tok = vqtok.load(folder)
    x = images(7)
    with torch.no_grad():
        reference = tok.encode(x).mean
        with torch.autocast("cpu", dtype=torch.bfloat16):
            upcast = tok.encode(x).mean
            tok.config = dataclasses.replace(tok.config, force_upcast=False)
            autocast = tok.encode(x).mean
    assert upcast.dtype == torch.float32 and max_err(upcast, reference) < 1e-6
    assert max_err(autocast.float(), reference) > 1e-3


def test_a_diffusers_folder_with_only_pickled_weights_is_refused(diffusers_folders, tmp_path):
    _, folder = diffusers_folders("sd")
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    torch.save(load_file(pickled / "diffusion_pytorch_model.safetensors"), pickled / "diffusion_pytorch_model.bin")
    (pickled / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has diffusion_pytorch_model.bin but no diffusion_pytorch_model.safetensors"):
        vqtok.load(pickled)
    with pytest.raises(ValueError, match="vqtok convert FILE OUT"):
        vqtok.load(pickled / "diffusion_pytorch_model.bin")
