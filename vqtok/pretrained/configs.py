"""Other libraries' model configs as vqtok `AutoencoderConfig`s: diffusers' config.json, LDM/taming's `ddconfig`,
LlamaGen's `ModelArgs`, or - when no config is given - read off the checkpoint's tensor shapes.

Each field is either translated exactly or refused with a `ConfigError` naming it: vqtok never builds a model that
only approximates the original. What the translation fixes:

- the encoder/decoder: taming's `ch` / diffusers' block_out_channels[0] is `base_channels`, the widths over it are
  `channel_mult` (diffusers' widths must be multiples of the first), `layers_per_block` / `num_res_blocks` is
  `num_res_blocks`, attention levels become `attn_resolutions` at the config's resolution (`sample_size`, taming's
  `resolution`, 256 for LlamaGen and for shapes), GroupNorm groups `norm_groups` (32 in all three; shapes cannot
  tell it, so `norm_groups` is asked for when they are all there is);
- the bottleneck: diffusers' AutoencoderKL and LDM's `double_z` models are Gaussian with `dim` = the latent
  (embed) channels; VQModel and taming's VQGAN a VQ of `num_vq_embeddings`/`n_embed` codes; LlamaGen's a VQ with
  `l2_normalize` (its codebook_l2_norm). Converted codebooks are gradient-trained (`ema: false`, codebook_weight 1,
  beta 0.25 as in taming and LlamaGen), initialised (no k-means) and without restarts, ready to fine-tune.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vqtok.config import AutoencoderConfig, ConfigError, GaussianConfig, PreprocessConfig, VQConfig
from vqtok.pretrained.layouts import Layout

DEFAULT_RESOLUTION = 256  # taming's VQGANs and LlamaGen's tokenizers (attention placement only needs a size)


def converted_vq(codebook_size: int, dim: int, *, l2_normalize: bool = False, beta: float = 0.25) -> VQConfig:
    return VQConfig(codebook_size=codebook_size, dim=dim, beta=beta, ema=False, codebook_weight=1.0,
                    l2_normalize=l2_normalize, kmeans_init=False, dead_threshold=0.0)


def _levels_config(*, where: str, in_channels: int, out_channels: int, widths: list[int], num_res_blocks: int,
                   attn_levels: list[int], resolution: int, **rest: Any) -> AutoencoderConfig:
    """The AutoencoderConfig of an encoder/decoder given per level (widths, levels with attention). Its `preprocess`
    neither resizes nor crops: the resolution only places attention, and such models encode any size (each side is
    trimmed to a multiple of the downsampling factor)."""
    if out_channels != in_channels:
        raise ConfigError(f"{where}: {out_channels} output channels for {in_channels} input channels; vqtok's decoder "
                          "gives back the encoder's channels")
    base = widths[0]
    if any(w % base for w in widths):
        raise ConfigError(f"{where}: level widths {widths} are not multiples of the first ({base}); vqtok's levels are "
                          "base_channels x channel_mult")
    f = 2 ** (len(widths) - 1)
    if resolution < f or resolution % f:
        raise ConfigError(f"{where}: resolution {resolution} is not a multiple of the downsampling factor {f}")
    try:
        return AutoencoderConfig(in_channels=in_channels, resolution=resolution, base_channels=base,
                                 channel_mult=tuple(w // base for w in widths), num_res_blocks=num_res_blocks,
                                 attn_resolutions=tuple(resolution // 2**i for i in attn_levels), input_range="-1,1",
                                 preprocess=PreprocessConfig(resize=None, crop=None), **rest)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _refuse_unknown(where: str, data: Mapping[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(k for k in data if k not in known and not str(k).startswith("_"))
    if unknown:
        raise ConfigError(f"{where}: {what} field(s) {', '.join(map(repr, unknown))} are not understood by vqtok's "
                          "converter; refusing rather than loading approximately")


def _require_value(where: str, data: Mapping[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    if key in data and data[key] not in allowed:
        raise ConfigError(f"{where}: '{key}' is {data[key]!r}; vqtok's modules support only {allowed[0]!r}")


# ----------------------------------------------------------------------------------------------------------------
# diffusers

DIFFUSERS_CLASSES = ("AutoencoderKL", "VQModel")
DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {  # the constructors' defaults (a test checks them against diffusers)
    "AutoencoderKL": {
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
        "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
        "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": True,
        "use_post_quant_conv": True, "mid_block_add_attention": True,
    },
    "VQModel": {
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
        "latent_channels": 3, "sample_size": 32, "num_vq_embeddings": 256, "norm_num_groups": 32,
        "vq_embed_dim": None, "scaling_factor": 0.18215, "norm_type": "group", "mid_block_add_attention": True,
        "lookup_from_codebook": False, "force_upcast": False,
    },
}
DOWN_BLOCKS = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # -> attention after each block
UP_BLOCKS = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def diffusers_config(raw: Mapping[str, Any], *, where: str) -> AutoencoderConfig:
    """diffusers' AutoencoderKL / VQModel config.json -> AutoencoderConfig (exact, or a ConfigError naming the
    field)."""
    class_name = raw.get("_class_name")
    if class_name not in DIFFUSERS_CLASSES:
        raise ConfigError(f"{where}: a diffusers {class_name!r}; vqtok converts {' and '.join(DIFFUSERS_CLASSES)}")
    defaults = DIFFUSERS_DEFAULTS[class_name]
    _refuse_unknown(where, raw, set(defaults), f"diffusers {class_name}")
    c = {**defaults, **raw}
    _require_value(where, c, "act_fn", ("silu", "swish"))
    _require_value(where, c, "norm_type", ("group",))
    for key in ("latents_mean", "latents_std"):
        if c.get(key) is not None:
            raise ConfigError(f"{where}: '{key}' is set (a per-channel latent normalisation); vqtok records only "
                              "scaling_factor and shift_factor")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    widths = [int(w) for w in c["block_out_channels"]]
    if len(down) != len(widths) or len(up) != len(widths):
        raise ConfigError(f"{where}: {len(down)} down_block_types and {len(up)} up_block_types for "
                          f"{len(widths)} block_out_channels")
    for key, types, known in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
        if unknown := [t for t in types if t not in known]:
            raise ConfigError(f"{where}: {key} {unknown} are not blocks vqtok has; it has {sorted(known)}")
    attn_down = [i for i, t in enumerate(down) if DOWN_BLOCKS[t]]
    attn_up = sorted(len(up) - 1 - k for k, t in enumerate(up) if UP_BLOCKS[t])  # up_blocks count from the bottom
    if attn_down != attn_up:
        raise ConfigError(f"{where}: down_block_types put attention at levels {attn_down} but up_block_types at "
                          f"{attn_up}; vqtok's encoder and decoder share attn_resolutions")
    resolution = _side(c["sample_size"], where)
    latent = int(c["latent_channels"])
    if class_name == "AutoencoderKL":
        bottleneck: Any = GaussianConfig(dim=latent)
        projections = {key: bool(c[key]) for key in ("use_quant_conv", "use_post_quant_conv")}
    else:
        bottleneck = converted_vq(int(c["num_vq_embeddings"]), int(c["vq_embed_dim"] or latent))
        projections = {}
    return _levels_config(
        where=where, in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]), widths=widths,
        num_res_blocks=int(c["layers_per_block"]), attn_levels=attn_down, resolution=resolution,
        bottleneck=bottleneck, latent_channels=latent, norm_groups=int(c["norm_num_groups"]),
        mid_attention=bool(c["mid_block_add_attention"]), force_upcast=bool(c["force_upcast"]),
        scaling_factor=float(c["scaling_factor"]), shift_factor=float(c.get("shift_factor") or 0.0), **projections,
    )


def _side(sample_size: Any, where: str) -> int:
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise ConfigError(f"{where}: sample_size {list(sample_size)} is not square; vqtok's resolution is one side")
        sample_size = sample_size[0]
    return int(sample_size)


# ----------------------------------------------------------------------------------------------------------------
# LDM / taming

DDCONFIG_KEYS = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                 "attn_resolutions", "dropout", "attn_type", "resamp_with_conv", "give_pre_end", "tanh_out",
                 "use_linear_attn"}
# Training-only parameters of taming's VQModel / LDM's AutoencoderKL and VQModel (the loss, the data, logging)
LDM_TRAINING_KEYS = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "monitor", "colorize_nlabels",
                     "scheduler_config", "lr_g_factor", "batch_resize_range", "base_learning_rate", "use_ema",
                     "sane_index_shape", "learning_rate"}


def ldm_config(spec: Mapping[str, Any], *, where: str) -> AutoencoderConfig:
    """A taming/LDM first-stage config -> AutoencoderConfig. `spec` is the model's YAML as the repositories ship it
    (`model: {target, params: {ddconfig, embed_dim, n_embed, lossconfig}}`; in a latent diffusion YAML, its
    `first_stage_config`), or its `params`, or a flat mapping of the ddconfig keys with `embed_dim` and `n_embed`."""
    params, target = _ldm_params(spec)
    if target and "Gumbel" in target:
        raise ConfigError(f"{where}: target {target} (Gumbel quantization) is not a quantizer vqtok has")
    if isinstance(params.get("ddconfig"), Mapping):
        ddconfig, top = params["ddconfig"], {k: v for k, v in params.items() if k != "ddconfig"}
    else:  # flat
        ddconfig = {k: v for k, v in params.items() if k in DDCONFIG_KEYS}
        top = {k: v for k, v in params.items() if k not in DDCONFIG_KEYS}
    _refuse_unknown(where, ddconfig, DDCONFIG_KEYS, "ddconfig")
    _refuse_unknown(where, top, {"embed_dim", "n_embed", "remap", "beta"} | LDM_TRAINING_KEYS, "first-stage")
    for key, allowed in (("attn_type", ("vanilla",)), ("resamp_with_conv", (True,)), ("give_pre_end", (False,)),
                         ("tanh_out", (False,)), ("use_linear_attn", (False,))):
        _require_value(where, ddconfig, key, allowed)
    if top.get("remap") is not None:
        raise ConfigError(f"{where}: 'remap' (a remapped code subset) is not supported")
    missing = [k for k in ("z_channels", "resolution", "ch", "ch_mult", "num_res_blocks", "embed_dim")
               if k not in ddconfig and k not in top]
    if missing:
        raise ConfigError(f"{where}: the config lacks {', '.join(missing)}")
    z, resolution, ch = int(ddconfig["z_channels"]), int(ddconfig["resolution"]), int(ddconfig["ch"])
    mult = [int(m) for m in ddconfig["ch_mult"]]
    double_z = bool(ddconfig.get("double_z", "n_embed" not in top))
    if "n_embed" in top:
        if double_z:
            raise ConfigError(f"{where}: n_embed (a VQ) with double_z true (a Gaussian's mean and variance)")
        bottleneck: Any = converted_vq(int(top["n_embed"]), int(top["embed_dim"]), beta=float(top.get("beta", 0.25)))
    elif not double_z:
        raise ConfigError(f"{where}: double_z is false and there is no n_embed: neither a KL nor a VQ first stage")
    else:
        bottleneck = GaussianConfig(dim=int(top["embed_dim"]))
    sizes = [resolution // 2**i for i in range(len(mult))]
    attn_levels = [i for i, s in enumerate(sizes) if s in set(ddconfig.get("attn_resolutions", ()))]
    return _levels_config(
        where=where, in_channels=int(ddconfig.get("in_channels", 3)), out_channels=int(ddconfig.get("out_ch", 3)),
        widths=[ch * m for m in mult], num_res_blocks=int(ddconfig["num_res_blocks"]), attn_levels=attn_levels,
        resolution=resolution, bottleneck=bottleneck, latent_channels=z, dropout=float(ddconfig.get("dropout", 0.0)),
    )


def _ldm_params(spec: Mapping[str, Any]) -> tuple[Mapping[str, Any], str | None]:
    node: Any = spec["model"] if isinstance(spec.get("model"), Mapping) else spec
    target = None
    if isinstance(node.get("params"), Mapping) and isinstance(node["params"].get("first_stage_config"), Mapping):
        node = node["params"]["first_stage_config"]
    if isinstance(node.get("params"), Mapping):
        target = node.get("target")
        node = node["params"]
    return node, target


# ----------------------------------------------------------------------------------------------------------------
# LlamaGen

LLAMAGEN_DEFAULTS: dict[str, Any] = {  # tokenizer/tokenizer_image/vq_model.py: ModelArgs, and the Encoder's ch/blocks
    "codebook_size": 16384, "codebook_embed_dim": 8, "codebook_l2_norm": True, "codebook_show_usage": True,
    "commit_loss_beta": 0.25, "entropy_loss_ratio": 0.0, "encoder_ch_mult": [1, 1, 2, 2, 4],
    "decoder_ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "dropout_p": 0.0,
    "ch": 128, "num_res_blocks": 2, "resolution": DEFAULT_RESOLUTION, "in_channels": 3,
}


def llamagen_config(args: Mapping[str, Any], *, where: str) -> AutoencoderConfig:
    """LlamaGen's VQ ModelArgs (its defaults for anything not given) -> AutoencoderConfig. Its encoder has attention
    in every block of the lowest-resolution level and in the mid block, as does its decoder."""
    _refuse_unknown(where, args, set(LLAMAGEN_DEFAULTS), "LlamaGen ModelArgs")
    c = {**LLAMAGEN_DEFAULTS, **args}
    if list(c["encoder_ch_mult"]) != list(c["decoder_ch_mult"]):
        raise ConfigError(f"{where}: encoder_ch_mult {c['encoder_ch_mult']} differs from decoder_ch_mult "
                          f"{c['decoder_ch_mult']}; vqtok's decoder mirrors the encoder")
    mult = [int(m) for m in c["encoder_ch_mult"]]
    ch = int(c["ch"])
    return _levels_config(
        where=where, in_channels=int(c["in_channels"]), out_channels=int(c["in_channels"]),
        widths=[ch * m for m in mult],
        num_res_blocks=int(c["num_res_blocks"]), attn_levels=[len(mult) - 1], resolution=int(c["resolution"]),
        bottleneck=converted_vq(int(c["codebook_size"]), int(c["codebook_embed_dim"]),
                                l2_normalize=bool(c["codebook_l2_norm"]), beta=float(c["commit_loss_beta"])),
        latent_channels=int(c["z_channels"]), dropout=float(c["dropout_p"]),
    )


# ----------------------------------------------------------------------------------------------------------------
# From the tensors alone


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], layout: Layout, *, where: str,
                       resolution: int = DEFAULT_RESOLUTION, norm_groups: int = 32,
                       l2_normalize: bool | None = None) -> AutoencoderConfig:
    """The AutoencoderConfig a checkpoint's tensor shapes imply, read through `layout`: widths from the encoder's
    convolutions, blocks per level, attention where its tensors are, Gaussian (no codebook, 2 x latent encoder
    outputs) or VQ, the projections if present. Not in the shapes: `resolution` (only places attention, by level),
    `norm_groups`, and whether codes are l2-normalised (LlamaGen's are, by default)."""

    def shape(name: str, levels: int = 0) -> tuple[int, ...] | None:
        return shapes.get(layout.source_name(name, levels))

    def need(name: str, levels: int = 0) -> tuple[int, ...]:
        found = shape(name, levels)
        if found is None:
            raise ConfigError(f"{where}: no tensor '{layout.source_name(name, levels)}' (a {layout.format} "
                              "encoder/decoder has one)")
        return found

    conv_in = need("encoder.conv_in.weight")
    widths = []
    while (block := shape(f"encoder.levels.{len(widths)}.blocks.0.conv1.weight")) is not None:
        widths.append(block[0])
    if not widths:
        need("encoder.levels.0.blocks.0.conv1.weight")
    n = len(widths)
    blocks = 0
    while shape(f"encoder.levels.0.blocks.{blocks}.conv1.weight") is not None:
        blocks += 1
    attn_enc = [i for i in range(n) if shape(f"encoder.levels.{i}.attns.0.q.weight") is not None]
    attn_dec = [i for i in range(n) if shape(f"decoder.levels.{i}.attns.0.q.weight", n) is not None]
    if attn_enc != attn_dec:
        raise ConfigError(f"{where}: attention at encoder levels {attn_enc} but decoder levels {attn_dec}; vqtok's "
                          "encoder and decoder share attn_resolutions")
    mid_enc, mid_dec = (shape(f"{part}.mid.attn.q.weight") is not None for part in ("encoder", "decoder"))
    if mid_enc != mid_dec:
        raise ConfigError(f"{where}: mid-block attention in the {'encoder' if mid_enc else 'decoder'} only")
    encoder_out = need("encoder.conv_out.weight")[0]
    latent = need("decoder.conv_in.weight")[1]
    codebook = shape("bottleneck.codebook")
    quant, post = shape("quant_conv.weight"), shape("post_quant_conv.weight")
    if codebook is None:
        if encoder_out != 2 * latent:
            raise ConfigError(f"{where}: no codebook, so a Gaussian first stage, but the encoder gives {encoder_out} "
                              f"channels for {latent} latent channels (a mean and a log-variance each)")
        bottleneck: Any = GaussianConfig(dim=quant[0] // 2 if quant else latent)
    else:
        l2 = layout.format == "llamagen" if l2_normalize is None else l2_normalize
        bottleneck = converted_vq(codebook[0], codebook[1], l2_normalize=l2)
    return _levels_config(
        where=where, in_channels=conv_in[1], out_channels=need("decoder.conv_out.weight", n)[0], widths=widths,
        num_res_blocks=blocks, attn_levels=attn_enc, resolution=resolution, bottleneck=bottleneck,
        latent_channels=latent, norm_groups=norm_groups, mid_attention=mid_enc,
        use_quant_conv=quant is not None, use_post_quant_conv=post is not None,
    )
