"""Configs as dataclasses, mirrored one-to-one by YAML and by `config.json`.

Every config is a frozen dataclass whose `__post_init__` rejects bad values with a `ConfigError` naming the field.
`from_dict` turns plain data (parsed YAML or JSON) into configs and is strict: an unknown key, a missing
discriminator or a value of the wrong type is an error that names the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value, key or file that cannot be used; the message names the key and the source."""


MAX_MODEL_ELEMENTS = 2**31
"""The most parameters and buffers (elements, all tensors together) a config may describe: 2^31, 8 GiB in float32
(a training run holds about four times that with AdamW's moments and the gradients). Every model config counts its
model's elements exactly from the config (`num_elements`) and refuses beyond this bound, so a typo such as
`base_channels: 100000` or a codebook of 1e9 entries is an error naming the keys before anything is allocated.
Raise it in Python (`vqtok.config.MAX_MODEL_ELEMENTS = ...`) for a model that really is larger."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ----------------------------------------------------------------------------------------------------------------
# Bottlenecks


@dataclass(frozen=True)
class GaussianConfig:
    """Diagonal Gaussian posterior q(z|x) = N(mu, sigma^2) with KL to N(0, I).

    `beta` weights the KL (beta-VAE; 1 gives the ELBO). `free_bits` (nats per latent element, 0 = off) stops the
    optimiser from pushing the batch-averaged KL of any latent element below that floor (Kingma et al. 2016).
    """

    kind: Literal["gaussian"] = "gaussian"
    dim: int = 4
    beta: float = 1.0
    free_bits: float = 0.0

    def __post_init__(self) -> None:
        _require(self.dim >= 1, f"dim must be >= 1, got {self.dim}")
        _require(self.beta >= 0 and _finite(self.beta), f"beta must be finite and >= 0, got {self.beta}")
        _require(
            self.free_bits >= 0 and _finite(self.free_bits),
            f"free_bits must be finite and >= 0, got {self.free_bits}",
        )


@dataclass(frozen=True)
class VQConfig:
    """Vector-quantized bottleneck: nearest code, straight-through gradient, EMA or gradient-trained codebook.

    `beta` weights the commitment term beta*||z - sg(e)||^2 (on the encoder). With `ema` the codebook follows
    exponential moving averages of its assigned vectors and the codebook loss term does not exist; without it the
    codebook is a parameter trained by ||sg(z) - e||^2 weighted by `codebook_weight`, which must then be set.
    `dead_threshold` is relative to the expected count per code (vectors per step / K); 0 turns restarts off.
    `kmeans_samples` of None means max(4096, 4 * codebook_size). `l2_normalize` puts z and codes on the unit sphere
    (cosine similarity search; with a small `dim` this is the LlamaGen recipe). `search_chunk` bounds the distance
    matrix of the nearest-code search to that many floats; None sizes it to the device: on a CPU max(2^21, 512 * K)
    up to 2^25 (128 MiB), on a GPU min(1 GiB, a quarter of the free memory), one chunk when N x K fits (see
    `vqtok.bottleneck.search`). `search: auto` takes the fused Triton search where it applies (CUDA, triton
    installed, dim <= 64: no distance matrix at all) and the matmul search elsewhere; `torch` (the default until the
    kernel is measured on a GPU, see BENCHMARKS.md) always the matmul search. Both are exact in float32.
    `rotation_trick` (Fifty et al. 2024) replaces the straight-through gradient by one through the rotation and
    rescaling that carry z onto its code: the decoder still gets the code exactly, the encoder gets
    (||e|| / ||z||) R^T g instead of g (R the rotation of z/||z|| onto e/||e||; lambda = 1 with `l2_normalize`).
    Off by default: on CIFAR-10 at K = 1,024 it did not win over two seeds (BENCHMARKS.md, "Discrete bottlenecks");
    the commitment and codebook losses are unchanged.
    """

    kind: Literal["vq"] = "vq"
    codebook_size: int = 1024
    dim: int = 64
    beta: float = 0.25
    ema: bool = True
    decay: float = 0.99
    eps: float = 1e-5
    codebook_weight: float | None = None
    l2_normalize: bool = False
    kmeans_init: bool = True
    kmeans_iters: int = 10
    kmeans_samples: int | None = None
    dead_threshold: float = 0.03
    usage_window: int = 100
    search_chunk: int | None = None
    search: Literal["torch", "auto"] = "torch"
    rotation_trick: bool = False

    def __post_init__(self) -> None:
        _require(self.codebook_size >= 2, f"codebook_size must be >= 2, got {self.codebook_size}")
        _require(self.codebook_size <= 1 << 31, f"codebook_size is too large: {self.codebook_size}")
        _require(self.dim >= 1, f"dim must be >= 1, got {self.dim}")
        _require(self.beta >= 0 and _finite(self.beta), f"beta must be finite and >= 0, got {self.beta}")
        _require(0.0 < self.decay < 1.0, f"decay must be in (0, 1), got {self.decay}")
        _require(0.0 < self.eps < 1.0, f"eps must be in (0, 1), got {self.eps}")
        if self.ema:
            _require(
                self.codebook_weight is None,
                "codebook_weight is set but ema is true: an EMA codebook is not trained by "
                "gradients, so a codebook loss would have no effect. Remove codebook_weight or set ema: false.",
            )
        else:
            _require(
                self.codebook_weight is not None and self.codebook_weight > 0 and _finite(self.codebook_weight),
                "ema is false, so the codebook is trained by its loss: set codebook_weight "
                f"to a finite value > 0 (1.0 in VQ-VAE), got {self.codebook_weight}",
            )
        _require(self.kmeans_iters >= 1, f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if self.kmeans_samples is not None:
            _require(
                self.kmeans_samples >= self.codebook_size,
                f"kmeans_samples ({self.kmeans_samples}) must be >= codebook_size ({self.codebook_size})",
            )
        _require(
            0.0 <= self.dead_threshold < 1.0, f"dead_threshold must be in [0, 1), got {self.dead_threshold}"
        )
        _require(self.usage_window >= 1, f"usage_window must be >= 1, got {self.usage_window}")
        _require(self.search_chunk is None or self.search_chunk >= 1, f"search_chunk must be >= 1, got {self.search_chunk}")
        _require_size(self.num_elements, f"codebook_size {self.codebook_size} with dim {self.dim} give a codebook")

    @property
    def num_elements(self) -> int:
        """Elements of the quantizer's tensors: the codebook, its EMA sums (with `ema`), counts, last use, scalars."""
        k, d = self.codebook_size, self.dim
        return k * d * (2 if self.ema else 1) + 2 * k + 6

    @property
    def kmeans_reservoir(self) -> int:
        """Encoder outputs gathered (over the first batches and all ranks) before k-means initialisation."""
        return self.kmeans_samples if self.kmeans_samples is not None else max(4096, 4 * self.codebook_size)


# BottleneckConfig, the union of the bottlenecks' configs, is defined at the end of this module: FSQConfig,
# LFQConfig and RVQConfig live beside their quantizers (vqtok/bottleneck/fsq.py, lfq.py, rvq.py), which import the
# helpers above.


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer


class _ModelResolution:
    """The default of `PreprocessConfig.resize` and `crop`: the resolution of the model whose config holds it, filled
    in when that config is built (so config.json records the number). One instance, `MODEL_RESOLUTION`."""

    _instance: "_ModelResolution | None" = None

    def __new__(cls) -> "_ModelResolution":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MODEL_RESOLUTION"

    def __reduce__(self) -> str:
        return "MODEL_RESOLUTION"  # pickled (DataLoader workers, deepcopy) as this module's one instance


MODEL_RESOLUTION: Any = _ModelResolution()


@dataclass(frozen=True)
class PreprocessConfig:
    """How images of any size become model inputs, recorded in config.json so `preprocess` repeats it exactly:
    resize the shorter side to `resize` (bicubic, antialiased), then centre-crop to `crop` x `crop`.

    Either size left out is the model's `resolution` (MODEL_RESOLUTION until the model's config fills it in), so by
    default every image is resized and centre-cropped to the size the model trains at; null (None) turns a step off.
    Without a crop, each side is then trimmed (centrally) to a multiple of the model's downsampling factor, the sizes
    `encode` takes. A config.json records both numbers, so a model keeps its preprocessing whatever later defaults."""

    resize: int | None = MODEL_RESOLUTION
    crop: int | None = MODEL_RESOLUTION

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            _require(value is None or value is MODEL_RESOLUTION or value >= 1, f"{name} must be >= 1, got {value}")
        _require(
            not self.resolved or self.crop is None or self.resize is None or self.crop <= self.resize,
            f"crop ({self.crop}) must not exceed resize ({self.resize})",
        )

    @property
    def resolved(self) -> bool:
        """Whether both sizes are numbers or None (not MODEL_RESOLUTION, the default a model config fills in)."""
        return self.resize is not MODEL_RESOLUTION and self.crop is not MODEL_RESOLUTION

    def resolve(self, resolution: int) -> "PreprocessConfig":
        """This preprocessing with each size left at its default set to `resolution`. The crop that defaults to a
        resolution above an explicit resize is refused, naming both (the resized image would be too small)."""
        if self.resolved:
            return self
        crop = resolution if self.crop is MODEL_RESOLUTION else self.crop
        resize = resolution if self.resize is MODEL_RESOLUTION else self.resize
        _require(self.crop is not MODEL_RESOLUTION or resize is None or crop <= resize,
                 f"preprocess.resize ({resize}) is below the model's resolution {resolution}, which preprocess.crop "
                 f"(not given) defaults to: set crop to at most {resize}, or null for no crop")
        return PreprocessConfig(resize=resize, crop=crop)


def resolve_preprocess(config: Any, *, multiple: int | None = None) -> None:
    """Fill in a model config's `preprocess` (in `__post_init__`, so config.json records the numbers) and refuse the
    sizes that would turn every image into one that `encode` rejects: the last size set (the crop, else the resize
    of the shorter side) must be a multiple of `multiple` (an autoencoder's downsampling factor), or with `multiple`
    None equal to the resolution (a hierarchical VAE takes its resolution only)."""
    p = config.preprocess.resolve(config.resolution)
    object.__setattr__(config, "preprocess", p)
    if p.crop is not None:
        name, size, what = "crop", p.crop, f"every image {p.crop}x{p.crop}"
    elif p.resize is not None:
        name, size, what = "resize", p.resize, f"every image's shorter side {p.resize} (preprocess.crop is null)"
    else:
        return
    if multiple is None:
        _require(size == config.resolution,
                 f"preprocess.{name} ({size}) makes {what}, but this model takes images of its resolution "
                 f"{config.resolution} only: set preprocess.{name} to {config.resolution} or leave it out")
    else:
        _require(size % multiple == 0,
                 f"preprocess.{name} ({size}) makes {what}, which encode refuses: sides must be multiples of the "
                 f"downsampling factor {multiple}; use a multiple of {multiple}, or leave preprocess.{name} out (the "
                 "model's resolution)")


@dataclass(frozen=True)
class ConvertedFrom:
    """Where a tokenizer converted from another library's checkpoint came from (see `vqtok.pretrained`): the
    checkpoint `format` ('diffusers', 'ldm' for LDM/taming, 'llamagen'), its `source` (a Hub repo id or the file or
    folder as given), the Hub `revision` (commit) it was read at, the SHA-256 of its weights file, the original
    class (diffusers' `_class_name`) and the licence, when the user names one."""

    format: Literal["diffusers", "ldm", "llamagen"]
    source: str
    revision: str | None = None
    weights_sha256: str | None = None
    class_name: str | None = None
    license: str | None = None


@dataclass(frozen=True)
class AutoencoderConfig:
    """Encoder + bottleneck + decoder, in the VQGAN/LDM layout (taming-transformers, diffusers).

    The downsampling factor is 2 ** (len(channel_mult) - 1). Attention blocks go at the encoder/decoder levels
    whose feature size, for an input of `resolution`, is in `attn_resolutions`; any input whose sides are divisible
    by the factor works. `latent_channels` is the encoder's output width (taming's z_channels); 1x1 convolutions
    map it to and from the bottleneck's `dim`. `input_range` is the range images are mapped into by `preprocess`,
    which by default also resizes and centre-crops them to `resolution` (see PreprocessConfig).

    `use_quant_conv` / `use_post_quant_conv` false drop those 1x1 projections (the SD3 and FLUX VAEs); the widths
    must then agree. `scaling_factor` and `shift_factor` are the latent normalisation a diffusion model trained on
    this VAE's latents expects, z' = (z - shift_factor) * scaling_factor (`Autoencoder.scale_latents`): recorded,
    never applied by `encode`/`decode`. `force_upcast` runs the model in float32 even under autocast (diffusers' flag
    for VAEs that overflow in float16). `converted_from` records a converted checkpoint's origin.

    `num_classes` N > 0 makes a class-conditional autoencoder (a CVAE for a Gaussian bottleneck): a learned label
    embedding of width `base_channels` is added to the encoder's conv_in output, and one of the decoder's deepest
    width to the decoder's conv_in output (before its mid block), each broadcast over positions. Their tables have
    N + 1 rows; the last, label N, is the null label, fixed at zero, so a pass with it is exactly the unconditional
    architecture (see vqtok.nn.conditioning). 0 (the default) is unconditional, as before: no label tensors.
    """

    bottleneck: BottleneckConfig = field(default_factory=VQConfig)
    in_channels: int = 3
    resolution: int = 32
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    mid_attention: bool = True
    latent_channels: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    input_range: Literal["-1,1", "0,1"] = "-1,1"
    decoder_output: Literal["image", "bernoulli_logits", "logistic_mixture"] = "image"
    num_mixtures: int | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    converted_from: ConvertedFrom | None = None
    num_classes: int = 0

    def __post_init__(self) -> None:
        _freeze_lists(self)
        check_pixel_likelihood(self)
        _require(self.num_classes >= 0, f"num_classes must be >= 0 (0: unconditional), got {self.num_classes}")
        _require(self.use_quant_conv or self.bottleneck.dim == self.latent_channels,
                 f"use_quant_conv is false, so the bottleneck's dim ({self.bottleneck.dim}) must equal latent_channels "
                 f"({self.latent_channels}), the encoder's output")
        _require(self.use_post_quant_conv or self.bottleneck.dim == self.latent_channels,
                 f"use_post_quant_conv is false, so the bottleneck's dim ({self.bottleneck.dim}) must equal "
                 f"latent_channels ({self.latent_channels}), the decoder's input")
        _require(_finite(self.scaling_factor) and self.scaling_factor > 0,
                 f"scaling_factor must be finite and > 0, got {self.scaling_factor}")
        _require(_finite(self.shift_factor), f"shift_factor must be finite, got {self.shift_factor}")
        _require(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        _require(self.base_channels >= 1, f"base_channels must be >= 1, got {self.base_channels}")
        _require(len(self.channel_mult) >= 1, "channel_mult must name at least one level")
        _require(all(m >= 1 for m in self.channel_mult), f"channel_mult entries must be >= 1, got {self.channel_mult}")
        _require(self.num_res_blocks >= 1, f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        _require(self.latent_channels >= 1, f"latent_channels must be >= 1, got {self.latent_channels}")
        _require(self.norm_groups >= 1, f"norm_groups must be >= 1, got {self.norm_groups}")
        for width in sorted({self.base_channels * m for m in self.channel_mult} | {self.base_channels}):
            _require(
                width % self.norm_groups == 0,
                f"norm_groups ({self.norm_groups}) must divide every block width; "
                f"base_channels * channel_mult gives {width}",
            )
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        f = self.downsampling_factor
        _require(
            self.resolution >= f and self.resolution % f == 0,
            f"resolution ({self.resolution}) must be a positive multiple of the downsampling factor {f} "
            f"(2 ** (len(channel_mult) - 1))",
        )
        resolve_preprocess(self, multiple=f)
        reachable = {self.resolution // 2**i for i in range(len(self.channel_mult))}
        unknown = sorted(set(self.attn_resolutions) - reachable)
        _require(
            not unknown,
            f"attn_resolutions {unknown} are not feature sizes of this model at resolution {self.resolution}; "
            f"the levels have sizes {sorted(reachable, reverse=True)}",
        )
        _require_size(self.num_elements, f"base_channels {self.base_channels} with channel_mult "
                      f"{list(self.channel_mult)}, num_res_blocks {self.num_res_blocks} and latent_channels "
                      f"{self.latent_channels} give a model")

    @property
    def num_elements(self) -> int:
        """Elements of every parameter and buffer of the `Autoencoder` this config builds, counted exactly (a test
        checks the count against built models): the size guard's measure, known before anything is allocated."""
        gaussian = isinstance(self.bottleneck, GaussianConfig)
        dim = self.bottleneck.dim
        encoder_out = self.latent_channels * (2 if gaussian else 1)  # a Gaussian's mean and log-variance
        if self.decoder_output == "logistic_mixture":
            from vqtok.losses import mixture_channels

            decoder_out = mixture_channels(self.num_mixtures, self.in_channels)
        else:
            decoder_out = self.in_channels
        projections = (_conv_elements(encoder_out, 2 * dim if gaussian else dim, 1) * self.use_quant_conv
                       + _conv_elements(dim, self.latent_channels, 1) * self.use_post_quant_conv)
        bottleneck = 0 if gaussian else self.bottleneck.num_elements
        labels = (self.num_classes + 1) * (self.base_channels + self.base_channels * self.channel_mult[-1]) \
            if self.num_classes else 0  # the encoder's and the decoder's label embeddings
        return (self._encoder_elements(encoder_out) + projections + bottleneck + self._decoder_elements(decoder_out)
                + labels)

    def _encoder_elements(self, out_channels: int) -> int:
        """The Encoder's: conv_in, per level its residual blocks (and attention) and a downsampling step but the
        last, the mid block, norm_out and conv_out."""
        widths = [self.base_channels * m for m in self.channel_mult]
        total = _conv_elements(self.in_channels, self.base_channels, 3)
        width, size = self.base_channels, self.resolution
        for i, out in enumerate(widths):
            blocks = self.num_res_blocks
            total += _res_elements(width, out) + (blocks - 1) * _res_elements(out, out)
            total += blocks * self._attention_elements(size, out)
            width = out
            if i < len(widths) - 1:
                total += _conv_elements(width, width, 3)
                size //= 2
        return total + _mid_elements(width, self.mid_attention) + 2 * width + _conv_elements(width, out_channels, 3)

    def _decoder_elements(self, out_channels: int) -> int:
        """The Decoder's: conv_in, the mid block, per level from the deepest num_res_blocks + 1 residual blocks (and
        attention) and an upsampling step but the last, norm_out and conv_out."""
        widths = [self.base_channels * m for m in self.channel_mult]
        width, size = widths[-1], self.resolution // self.downsampling_factor
        total = _conv_elements(self.latent_channels, width, 3) + _mid_elements(width, self.mid_attention)
        for i in reversed(range(len(widths))):
            blocks = self.num_res_blocks + 1
            total += _res_elements(width, widths[i]) + (blocks - 1) * _res_elements(widths[i], widths[i])
            total += blocks * self._attention_elements(size, widths[i])
            width = widths[i]
            if i > 0:
                total += _conv_elements(width, width, 3)
                size *= 2
        return total + 2 * width + _conv_elements(width, out_channels, 3)

    def _attention_elements(self, size: int, width: int) -> int:
        return _attn_elements(width) if size in self.attn_resolutions else 0

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_grid(self) -> tuple[int, int]:
        side = self.resolution // self.downsampling_factor
        return (side, side)

    @property
    def value_range(self) -> tuple[float, float]:
        return (-1.0, 1.0) if self.input_range == "-1,1" else (0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Data and training


@dataclass(frozen=True)
class DataConfig:
    """Where images come from.

    source: 'digits' (built in: scikit-learn's 1,797 handwritten digits, 8x8 grey, needs the [quickstart] extra),
    'folder' (an image folder; class sub-folders give labels), 'idx' (MNIST-style IDX files, plain or .gz: `path`
    the images, `labels` the labels), 'amat' (binarized MNIST's .amat text files, plain or .gz, no labels),
    'torchvision' (`name`, e.g. MNIST or CIFAR10, from the local root `path`, never downloaded). `split` selects
    train or test where the source has both. `skip_unreadable` (folders; `--skip-unreadable` for `vqtok encode` and
    `eval`) skips and counts image files that cannot be decoded instead of failing on the first one (`offset` and
    `limit` then count the readable ones). `offset` skips the first N images of the source and `limit` keeps the
    next N, so that a validation set can be carved from a training set (train: limit 50000; validation: offset
    50000, limit 10000); item i is then image offset + i of the source, and error messages name it so.

    `binarize` turns grey images into binary ones (0 or 255), each pixel a Bernoulli draw with probability
    pixel / 255, the usual protocol for likelihoods on MNIST with a Bernoulli decoder: 'once' draws each image once,
    from a generator keyed by `binarize_seed` and the image's index in the source (not in the dataset, so an image
    is binarized alike whatever the offset), the same at every read - a fixed set, for evaluation or encoding;
    'dynamic' leaves the images grey and the training loop draws them afresh each time they are drawn, keyed by
    `binarize_seed`, the step and the index (`vqtok.data.sources.dynamic_binarize`) - a training set only, since an
    evaluation set must be fixed. 'none' (the default) keeps the images as they are.
    """

    source: Literal["digits", "folder", "idx", "amat", "torchvision"] = "digits"
    path: str | None = None
    labels: str | None = None
    name: str | None = None
    split: Literal["train", "test"] = "train"
    skip_unreadable: bool = False
    limit: int | None = None
    offset: int = 0
    binarize: Literal["none", "once", "dynamic"] = "none"
    binarize_seed: int = 0

    def __post_init__(self) -> None:
        needs_path = self.source in ("folder", "idx", "amat", "torchvision")
        _require(not needs_path or bool(self.path), f"path is required for source '{self.source}'")
        _require(self.source != "digits" or self.path is None, "path is not used by the built-in 'digits'")
        _require(self.source == "idx" or self.labels is None, "labels is only used by source 'idx'")
        _require(self.source == "folder" or not self.skip_unreadable,
                 f"skip_unreadable skips image files that cannot be decoded: it applies to source 'folder' only, not "
                 f"'{self.source}'")
        _require((self.source == "torchvision") == (self.name is not None),
                 "name (e.g. MNIST, CIFAR10) is required for, and only for, source 'torchvision'")
        _require(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        _require(self.offset >= 0, f"offset must be >= 0, got {self.offset}")
        _require(0 <= self.binarize_seed < 2**32, f"binarize_seed must be in [0, 2^32), got {self.binarize_seed}")
        _require(self.binarize != "none" or self.binarize_seed == 0,
                 f"binarize_seed ({self.binarize_seed}) is used only with binarize 'once' or 'dynamic'")


@dataclass(frozen=True)
class RunConfig:
    """What every training run shares (tokenizers and priors): the optimisation, its safeguards and bookkeeping.

    batch_size is the global batch of one optimizer step (over all processes and accumulation micro-batches).
    AdamW with `warmup_steps` of linear warm-up, then cosine decay to `min_lr_ratio` x lr at max_steps.
    skip_grad_norm skips updates whose gradient norm (before clipping) is above it or not finite; more than
    max_consecutive_skips in a row stops the run with an error. weights_ema > 0 keeps an EMA of the weights, which is
    what gets exported. A checkpoint is saved every `checkpoint_every` steps (and at the end, and on SIGINT/SIGTERM);
    `keep_checkpoints` N deletes all but the newest N complete ones (None: keeps all).

    `mixed_precision` None (the default) leaves the choice to Accelerate: `accelerate launch --mixed_precision bf16`,
    the `accelerate config` default that `accelerate launch` applies, or the ACCELERATE_MIXED_PRECISION environment
    variable, else 'no'. A value given here wins over all of those (as an argument to Accelerator does). The run
    records the precision it used in config.yaml and run_info.json. `log_with` names Accelerate trackers (e.g.
    [tensorboard], [wandb]) that receive the hyperparameters, the metrics and the image grids, beside vqtok's own
    metrics.jsonl (always written); [] (the default) uses none.

    `compile: true` compiles the networks in place with torch.compile (a tokenizer's encoder and decoder, and the
    discriminator when there is one; a prior whole), without changing their checkpoints' keys: slower to start,
    faster per step on a GPU; it also works on CPU (inductor, needs a C++ compiler). Convolutional models train in
    channels_last memory format on CUDA, and AdamW is always fused (CPU, CUDA, MPS, XPU), compiled or not.
    metrics.jsonl reports steps_per_s, tflops (achieved TFLOP/s, one optimizer step's FLOPs counted once with
    torch.utils.flop_counter) and mfu, the fraction of `peak_tflops` (per device; null: a table of NVIDIA's dense
    peaks for the H100, H200 and A100 in the run's precision, no MFU elsewhere).
    """

    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 2e-4
    betas: tuple[float, ...] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    clip_grad_norm: float = 1.0
    skip_grad_norm: float | None = None
    max_consecutive_skips: int = 10
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    weights_ema: float = 0.0
    eval_every: int = 250
    checkpoint_every: int = 500
    log_every: int = 10
    keep_checkpoints: int | None = None
    log_with: tuple[str, ...] = ()
    compile: bool = False
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        _freeze_lists(self)
        _require(0 <= self.seed < 2**32, f"seed must be in [0, 2^32), got {self.seed}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every", "log_every",
                     "max_consecutive_skips"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.lr > 0 and _finite(self.lr), f"lr must be finite and > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two values in [0, 1), got {self.betas}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.clip_grad_norm >= 0, f"clip_grad_norm must be >= 0 (0 = off), got {self.clip_grad_norm}")
        _require(self.skip_grad_norm is None or self.skip_grad_norm > 0, f"skip_grad_norm must be > 0, got {self.skip_grad_norm}")
        _require(0 <= self.weights_ema < 1, f"weights_ema must be in [0, 1) (0 = off), got {self.weights_ema}")
        _require(self.keep_checkpoints is None or self.keep_checkpoints >= 1,
                 f"keep_checkpoints must be >= 1 (null: keep all), got {self.keep_checkpoints}")
        _require(all(isinstance(name, str) and name for name in self.log_with),
                 f"log_with must name trackers (e.g. [tensorboard]), got {list(self.log_with)}")
        _require(len(set(self.log_with)) == len(self.log_with),
                 f"log_with names a tracker twice: {list(self.log_with)}")
        _require(isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}")
        _require(self.peak_tflops is None or (self.peak_tflops > 0 and _finite(self.peak_tflops)),
                 f"peak_tflops must be finite and > 0 (null: from the GPU's name), got {self.peak_tflops}")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """A PatchGAN discriminator (pix2pix; taming's NLayerDiscriminator): a 4x4 stride-2 convolution from
    `in_channels` to `channels`, then `layers` - 1 more at stride 2 and one at stride 1, each doubling the width (up
    to 8 x channels) with BatchNorm and LeakyReLU(0.2), and a 4x4 convolution to one logit per patch."""

    in_channels: int = 3
    channels: int = 64
    layers: int = 3

    def __post_init__(self) -> None:
        _require(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        _require(self.channels >= 1, f"channels must be >= 1, got {self.channels}")
        _require(self.layers >= 1, f"layers must be >= 1, got {self.layers}")
        _require_size(self.num_elements, f"channels {self.channels} with layers {self.layers} give a discriminator")

    @property
    def num_elements(self) -> int:
        """Elements of the `PatchDiscriminator`'s parameters and buffers (BatchNorm's statistics included)."""
        c, n = self.channels, self.layers
        doubling = [c * 2**i for i in range(1, min(n, 3) + 1)]  # 2c, 4c, 8c: conv (no bias) + BatchNorm (4 + 1)
        total = _conv_elements(self.in_channels, c, 4)
        total += sum(i * o * 16 + 4 * o + 1 for i, o in zip([c] + doubling[:-1], doubling))
        total += max(n - 3, 0) * (8 * c * 8 * c * 16 + 4 * 8 * c + 1)  # the layers at the capped width 8c
        return total + _conv_elements(8 * c if n > 3 else doubling[-1], 1, 4)


@dataclass(frozen=True)
class AdversarialConfig:
    """The VQGAN adversarial term (Esser et al. 2021): a PatchGAN trained with the `loss` ('hinge', or
    'non_saturating' - softplus), switched on at optimizer step `start_step`. The tokenizer's loss gains
    lambda * L_G, with L_G = -mean(D(x_hat)) for the hinge loss (mean softplus(-D(x_hat)) otherwise); lambda is `weight` times, with `adaptive_weight`, the ratio
    ||grad L_rec|| / (||grad L_G|| + 1e-4) at the decoder's last layer (clamped to `max_adaptive_weight`), which
    keeps the two gradients at a set proportion. The discriminator has its own AdamW (`lr`, None: the run's lr;
    `betas`, taming's (0.5, 0.9)) at a constant rate, from its first step. `init_from`: a discriminator to start from (a
    run's `discriminator/` folder or a Hub repo id), for fine-tuning a tokenizer that was trained with one.
    """

    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: Literal["hinge", "non_saturating"] = "hinge"
    start_step: int = 0
    weight: float = 0.8
    adaptive_weight: bool = True
    max_adaptive_weight: float = 1e4
    lr: float | None = None
    betas: tuple[float, ...] = (0.5, 0.9)
    init_from: str | None = None

    def __post_init__(self) -> None:
        _freeze_lists(self)
        _require(self.start_step >= 0, f"start_step must be >= 0, got {self.start_step}")
        _require(self.weight > 0 and _finite(self.weight),
                 f"weight must be finite and > 0 (leave out the adversarial section to train without one), got {self.weight}")
        _require(self.max_adaptive_weight > 0, f"max_adaptive_weight must be > 0, got {self.max_adaptive_weight}")
        _require(self.lr is None or (self.lr > 0 and _finite(self.lr)), f"lr must be finite and > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two values in [0, 1), got {self.betas}")


LPIPS_MIN_SIZE = 16  # VGG16's four poolings before relu5_3


@dataclass(frozen=True)
class PerceptualConfig:
    """An LPIPS perceptual loss (Zhang et al. 2018, VGG16 variant), `weight` times the mean distance per image.
    `weights`: the safetensors file with the VGG16 backbone and LPIPS' linear heads (make it from the published
    files with `vqtok convert-lpips`); vqtok ships and downloads none, so without this section the
    perceptual term is absent (weight 0)."""

    weights: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(bool(self.weights), "weights is required: the path of an LPIPS-VGG16 safetensors file (see "
                 "vqtok convert-lpips); leave out the perceptual section to train without one")
        _require(self.weight > 0 and _finite(self.weight),
                 f"weight must be finite and > 0 (leave out the perceptual section to train without one), got {self.weight}")


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """A tokenizer training run (`vqtok train CONFIG.yaml`); the optimisation fields are RunConfig's.

    loss: 'mse' / 'l1' (means over pixels, the VQ-VAE convention), 'gaussian' (unit-variance Gaussian NLL),
    'bernoulli' (needs decoder_output 'bernoulli_logits') or 'logistic_mixture' (a discretized logistic mixture over
    the 8-bit grid, needs decoder_output 'logistic_mixture'), the last three in nats per image, the ELBO's scale.
    kl_schedule scales a Gaussian bottleneck's loss by 1 ('constant'), a linear ramp from 0 over kl_warmup_steps
    ('linear') or that ramp repeated every kl_cycle_steps ('cyclical', Fu et al. 2019).
    `adversarial` and `perceptual` add the VQGAN terms (absent: not used). `init_from` starts from a saved
    tokenizer (a folder or Hub repo id) whose config must equal `model`, to fine-tune it. `model` is an autoencoder's
    config, or a hierarchical VAE's with `kind: hierarchical_vae`.

    A class-conditional autoencoder (model.num_classes > 0) trains on each image's label, so `data` (and `eval_data`)
    must give one per image (see vqtok.data.labels). `class_dropout` p replaces a training image's label by the null
    label with probability p, a coin per (seed, step, image) like the flips, so that the model's unconditional pass
    (labels=None) is trained too; 0 (the default) trains the conditional passes only.
    """

    model: ModelConfig = field(default_factory=AutoencoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval_data: DataConfig | None = None
    output_dir: str = "runs/tokenizer"
    loss: Literal["mse", "l1", "gaussian", "bernoulli", "logistic_mixture"] = "mse"
    kl_schedule: Literal["constant", "linear", "cyclical"] = "constant"
    kl_warmup_steps: int = 0
    kl_cycle_steps: int = 0
    hflip: bool = False
    eval_images: int = 256
    num_workers: int = 2
    adversarial: AdversarialConfig | None = None
    perceptual: PerceptualConfig | None = None
    init_from: str | None = None
    class_dropout: float = 0.0

    @property
    def variational(self) -> bool:
        """Whether the model has a KL term: a Gaussian bottleneck, or a hierarchical VAE."""
        return getattr(self.model, "kind", None) == "hierarchical_vae" or self.model.bottleneck.kind == "gaussian"

    def __post_init__(self) -> None:
        super().__post_init__()
        image_terms = [name for name in ("adversarial", "perceptual") if getattr(self, name) is not None]
        _require(not image_terms or getattr(self.model, "kind", None) != "hierarchical_vae",
                 f"{' and '.join(image_terms)} (the VQGAN recipe) train an autoencoder; a hierarchical VAE is trained "
                 "by its likelihood: remove them")
        _require(not image_terms or self.model.decoder_output == "image",
                 f"{' and '.join(image_terms)} compare images, but model.decoder_output is "
                 f"{self.model.decoder_output!r} (a likelihood's parameters): use decoder_output 'image'")
        _require(self.perceptual is None or self.model.in_channels in (1, 3),
                 f"perceptual (LPIPS, a VGG16 on RGB) needs grey or RGB images, not {self.model.in_channels} channels")
        _require(self.perceptual is None or self.model.resolution >= LPIPS_MIN_SIZE,
                 f"perceptual (LPIPS) needs images of at least {LPIPS_MIN_SIZE} pixels a side (VGG16 halves them four "
                 f"times); model.resolution is {self.model.resolution}")
        if self.adversarial is not None:
            d_channels = self.adversarial.discriminator.in_channels
            _require(d_channels == self.model.in_channels,
                     f"adversarial.discriminator.in_channels ({d_channels}) must equal model.in_channels "
                     f"({self.model.in_channels})")
            _require(self.adversarial.start_step < self.max_steps,
                     f"adversarial.start_step ({self.adversarial.start_step}) must be below max_steps "
                     f"({self.max_steps}), or the discriminator would never train")
            layers = self.adversarial.discriminator.layers
            _require(3 * 2**layers <= self.model.resolution,
                     f"a {layers}-layer discriminator needs images of at least {3 * 2**layers} pixels a side; "
                     f"model.resolution is {self.model.resolution}: use fewer adversarial.discriminator.layers")
            _require(self.mixed_precision != "fp16",
                     "mixed_precision 'fp16' with an adversarial term is not supported (the tokenizer's and the "
                     "discriminator's optimizers would share one loss scaler); use 'bf16'")
        _require(self.eval_data is None or self.eval_data.binarize != "dynamic",
                 "eval_data.binarize 'dynamic' would evaluate on images drawn afresh at every evaluation; an "
                 "evaluation set must be fixed: use binarize 'once'")
        _require(self.eval_data is not None or self.data.binarize != "dynamic",
                 "data.binarize 'dynamic' without eval_data would evaluate on the training images left grey; set "
                 "eval_data (with binarize 'once')")
        _require(self.eval_images >= 1, f"eval_images must be >= 1, got {self.eval_images}")
        _require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        self._check_labels()
        gaussian = self.variational
        _require(
            gaussian or self.kl_schedule == "constant",
            f"kl_schedule '{self.kl_schedule}' needs a Gaussian bottleneck or a hierarchical VAE; this model's "
            f"bottleneck is '{getattr(getattr(self.model, 'bottleneck', None), 'kind', None)}'",
        )
        _require(self.kl_schedule != "linear" or self.kl_warmup_steps >= 1, "kl_schedule 'linear' needs kl_warmup_steps >= 1")
        _require(not getattr(self.model, "kl_balance", False) or self.kl_schedule != "constant",
                 "model.kl_balance balances the groups' KL during the KL warm-up, but kl_schedule is 'constant' (no "
                 "warm-up): set kl_schedule 'linear' (with kl_warmup_steps) or model.kl_balance false")
        _require(
            self.kl_schedule != "cyclical" or 1 <= self.kl_warmup_steps <= self.kl_cycle_steps,
            "kl_schedule 'cyclical' needs 1 <= kl_warmup_steps <= kl_cycle_steps",
        )
        _require(
            (self.loss == "bernoulli") == (self.model.decoder_output == "bernoulli_logits"),
            "loss 'bernoulli' and model.decoder_output 'bernoulli_logits' go together",
        )
        _require(
            (self.loss == "logistic_mixture") == (self.model.decoder_output == "logistic_mixture"),
            "loss 'logistic_mixture' and model.decoder_output 'logistic_mixture' go together",
        )
        _require(
            not gaussian or self.loss in ("gaussian", "bernoulli", "logistic_mixture"),
            f"loss '{self.loss}' is a mean over pixels but a VAE's KL is in nats per image, which would scale beta by "
            "the number of pixels; use loss 'gaussian', 'bernoulli' or 'logistic_mixture' and set beta",
        )

    def _check_labels(self) -> None:
        """class_dropout needs a conditional model, and a conditional model data whose source can have labels."""
        classes = getattr(self.model, "num_classes", 0)
        _require(0.0 <= self.class_dropout < 1.0, f"class_dropout must be in [0, 1), got {self.class_dropout}")
        _require(self.class_dropout == 0 or classes > 0,
                 f"class_dropout ({self.class_dropout}) drops labels, but the model is unconditional "
                 "(model.num_classes 0): set model.num_classes or remove class_dropout")
        if not classes:
            return
        for name in ("data", "eval_data"):
            data = getattr(self, name)
            _require(data is None or data.source != "amat",
                     f"model.num_classes is {classes} (class-conditional), but {name}.source 'amat' (binarized "
                     "MNIST's .amat files) has no labels")
            _require(data is None or data.source != "idx" or data.labels is not None,
                     f"model.num_classes is {classes} (class-conditional), but {name} gives no labels: set "
                     f"{name}.labels to the IDX labels file")


# ----------------------------------------------------------------------------------------------------------------
# The prior


@dataclass(frozen=True)
class TokenizerRef:
    """The tokenizer whose codes a prior models: a Hub repo id at a revision (a commit where known), or
    repo_id None for the copy saved in the prior's own `tokenizer/` sub-folder. weights_sha256 checks either."""

    repo_id: str | None = None
    revision: str | None = None
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        _require(len(self.weights_sha256) == 64 and all(c in "0123456789abcdef" for c in self.weights_sha256),
                 f"weights_sha256 must be 64 lowercase hex digits, got {self.weights_sha256!r}")
        _require(self.repo_id is not None or self.revision is None,
                 "revision is set but repo_id is not: a revision only applies to a Hub repository")


@dataclass(frozen=True)
class PriorConfig:
    """An autoregressive transformer over a tokenizer's code grid in raster order (decoder-only, pre-norm, GPT-2).

    `vocab_size`, `grid` (one image's code shape: [h, w], or [h, w, R] for a residual VQ's R levels per position,
    modelled as one sequence in raster order with the levels fastest: position (i, j) gives its R codes coarse to
    fine before the next position's) and `num_classes` (0: unconditional) describe the codes; left at None in a
    training config they are read from the token store (num_classes: 1 + the largest label, 0 when no image has
    one; a store where only some have labels needs an explicit 0). The sequence starts with a class token (or a start token when unconditional); `label_dropout` replaces
    the label with the null class that often in training so that classifier-free guidance works (None: 0.1 when
    class-conditional). `positions`: learned absolute embeddings or rotary (RoPE) in the attention.
    `tokenizer` is filled in by training from the token store and saved in config.json.
    """

    vocab_size: int | None = None
    grid: tuple[int, ...] | None = None
    num_classes: int | None = None
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 256
    mlp_ratio: int = 4
    dropout: float = 0.0
    positions: Literal["learned", "rotary"] = "learned"
    label_dropout: float | None = None
    tokenizer: TokenizerRef | None = None

    def __post_init__(self) -> None:
        _freeze_lists(self)
        _require(self.vocab_size is None or self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        _require(self.grid is None or (len(self.grid) in (2, 3) and all(g >= 1 for g in self.grid)),
                 f"grid must be [h, w] (or [h, w, R]: a residual VQ's levels) with positive sizes, got {self.grid}")
        _require(self.num_classes is None or self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        _require(self.positions != "rotary" or self.grid is None or len(self.grid) == 2,
                 f"rotary positions cannot tell a residual VQ's levels apart (grid {list(self.grid or ())}: its tokens "
                 "share one vocabulary, and RoPE gives attention only relative offsets): use positions: learned")
        for name in ("n_layer", "n_head", "n_embd", "mlp_ratio"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        _require(self.positions != "rotary" or (self.n_embd // self.n_head) % 2 == 0,
                 f"rotary positions need an even head size, got n_embd / n_head = {self.n_embd // self.n_head}")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        if self.label_dropout is not None:
            _require(0.0 <= self.label_dropout < 1.0, f"label_dropout must be in [0, 1), got {self.label_dropout}")
            _require(self.label_dropout == 0 or self.num_classes != 0,
                     "label_dropout is set but num_classes is 0 (an unconditional prior has no labels to drop)")
        if self.resolved:
            _require_size(self.num_elements, f"n_layer {self.n_layer}, n_embd {self.n_embd}, mlp_ratio "
                          f"{self.mlp_ratio}, vocab_size {self.vocab_size} and grid {list(self.grid)} give a prior")

    @property
    def num_elements(self) -> int:
        """Elements of every parameter and buffer of the `TransformerPrior` this (resolved) config builds."""
        c, t, hidden = self.n_embd, self.seq_len, self.mlp_ratio * self.n_embd
        block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (c * hidden + hidden) + (hidden * c + c)
        positions = t * c if self.positions == "learned" else 2 * t * (c // self.n_head)  # rotary: cos, sin
        return 2 * self.vocab_size * c + (self.num_classes + 1) * c + positions + self.n_layer * block + 2 * c

    @property
    def resolved(self) -> bool:
        """Whether the code description is complete (a model can be built)."""
        return None not in (self.vocab_size, self.grid, self.num_classes)

    @property
    def seq_len(self) -> int:
        """Codes per image: h * w (times R for a residual VQ's grid [h, w, R])."""
        return math.prod(self.grid)

    @property
    def class_dropout(self) -> float:
        if self.label_dropout is not None:
            return self.label_dropout
        return 0.1 if self.num_classes else 0.0


@dataclass(frozen=True)
class PriorTrainConfig(RunConfig):
    """A prior training run on a token store (`vqtok train-prior CONFIG.yaml`); optimisation fields are RunConfig's.

    `tokens` is the store's folder; `eval_tokens` a store of held-out images made by the same tokenizer (None: a
    seeded random 5% of `tokens`' images is held out and not trained on). `verify_tokens` also checks every store
    file's sha256 before training (a full read of the stores; the codes' range is checked in any case). Held-out loss
    is reported in bits per code, over at most `eval_items` images at periodic evaluations and over all of them at
    the end. About `num_samples` codes are sampled and decoded to a PNG grid at every evaluation.

    `tokenizer` (a folder or Hub id[@revision]; None: the one the store records, found relative to the store, then at
    its absolute path) says where the store's tokenizer is now, when its folder moved; its weights must be the ones
    the store records (their sha256), or training refuses it. A resumed run may give another place.
    """

    prior: PriorConfig = field(default_factory=PriorConfig)
    tokens: str = ""
    tokenizer: str | None = None
    eval_tokens: str | None = None
    verify_tokens: bool = False
    output_dir: str = "runs/prior"
    lr: float = 3e-4
    betas: tuple[float, ...] = (0.9, 0.95)
    weight_decay: float = 0.1
    eval_items: int = 10_000
    num_samples: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(bool(self.tokens), "tokens (the token store folder to train on) is required")
        _require(self.tokenizer is None or bool(self.tokenizer),
                 "tokenizer must name a folder or Hub id (or be left out: the token store's own)")
        _require(self.eval_items >= 1, f"eval_items must be >= 1, got {self.eval_items}")
        _require(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        _require(self.prior.tokenizer is None,
                 "prior.tokenizer is recorded from the token store by training; remove it from the config (to say "
                 "where the store's tokenizer is now, set the top-level tokenizer: PATH)")


# ----------------------------------------------------------------------------------------------------------------
# Plain data <-> dataclasses


def _freeze_lists(config: Any) -> None:
    """Lists given for tuple fields (e.g. built in Python) become tuples, so configs stay hashable and equal to
    their parsed copies."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list):
            object.__setattr__(config, f.name, tuple(value))


def check_pixel_likelihood(config: Any) -> None:
    """The decoder output, input range and mixture size of an image model's config agree (autoencoders and
    hierarchical VAEs): Bernoulli logits model [0, 1], the logistic mixture 8-bit values on [-1, 1]."""
    _require(config.decoder_output != "bernoulli_logits" or config.input_range == "0,1",
             "decoder_output 'bernoulli_logits' models pixels in [0, 1]: set input_range to '0,1'")
    mixture = config.decoder_output == "logistic_mixture"
    _require(not mixture or config.input_range == "-1,1",
             "decoder_output 'logistic_mixture' models 8-bit values on [-1, 1]: set input_range to '-1,1'")
    _require(mixture == (config.num_mixtures is not None),
             "num_mixtures is set for, and only for, decoder_output 'logistic_mixture' (e.g. 10; 1 is a single "
             f"discretized logistic); got decoder_output {config.decoder_output!r}, num_mixtures {config.num_mixtures}")
    _require(config.num_mixtures is None or config.num_mixtures >= 1, f"num_mixtures must be >= 1, got {config.num_mixtures}")


def _require_size(elements: int, what: str) -> None:
    """The size guard (see MAX_MODEL_ELEMENTS): `what` names the keys that set the size."""
    _require(
        elements <= MAX_MODEL_ELEMENTS,
        f"{what} of {elements:,} parameters and buffers ({elements * 4 / 2**30:,.1f} GiB in float32), more than "
        f"vqtok's limit of {MAX_MODEL_ELEMENTS:,} (vqtok.config.MAX_MODEL_ELEMENTS): a typo?",
    )


def _conv_elements(c_in: int, c_out: int, kernel: int) -> int:
    return c_in * c_out * kernel * kernel + c_out


def _res_elements(c_in: int, c_out: int) -> int:
    """A ResBlock: two GroupNorms, two 3x3 convolutions, a 1x1 shortcut when the widths differ."""
    shortcut = _conv_elements(c_in, c_out, 1) if c_in != c_out else 0
    return 2 * c_in + _conv_elements(c_in, c_out, 3) + 2 * c_out + _conv_elements(c_out, c_out, 3) + shortcut


def _attn_elements(width: int) -> int:
    """An AttnBlock: a GroupNorm and four 1x1 convolutions (q, k, v, proj)."""
    return 2 * width + 4 * _conv_elements(width, width, 1)


def _mid_elements(width: int, attention: bool) -> int:
    return 2 * _res_elements(width, width) + (_attn_elements(width) if attention else 0)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def to_dict(config: Any) -> dict[str, Any]:
    """A config as JSON/YAML-ready plain data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def from_dict(cls: type[T], data: Any, *, source: str = "config") -> T:
    """Build the dataclass `cls` from plain data, strictly: unknown keys and ill-typed values raise ConfigError."""
    try:
        return _convert(cls, data, path="", source=source)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80


def _show(value: Any) -> str:
    """A value as error messages quote it: its repr, shortened (a value may be huge or deeply nested)."""
    return _SHORT.repr(value)


def load_yaml(path: str | Path, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Read a YAML file into the config dataclass `cls`, after applying dotted KEY=VALUE `overrides` (values parsed
    as YAML, e.g. "model.bottleneck.beta=0.5"); errors name the file and the key.

    Strict: a key given twice in one mapping is an error (YAML parsers keep the last one silently), and so is an
    empty or comment-only file (write `{}` to take every default)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _parse_yaml(path.read_text())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e})") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if data is None:
        raise ConfigError(f"{path}: holds no config keys (empty or only comments); write {{}} to take every default")
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: must hold a mapping of config keys")
        apply_overrides(data, overrides)
    return from_dict(cls, data, source=str(path))


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted KEY=VALUE overrides (values parsed as YAML) to nested config data, in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
            node = child
        try:
            node[leaf] = _parse_yaml(value)
        except _DuplicateKey as e:
            raise ConfigError(f"--set {item!r}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
        except RecursionError:
            raise ConfigError(f"--set {key}: the value is nested too deeply") from None
    return data


class _DuplicateKey(yaml.YAMLError):
    """A mapping that gives one key twice."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping. Keys brought in by a merge (`<<: *base`) may
    be overridden, as YAML intends; only keys written out twice are refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not None:
                raise _DuplicateKey(f"key {key!r} is given twice (lines {first} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's core schema where PyYAML follows YAML 1.1: only true/false (any case as YAML 1.2 spells them) are
# booleans, so yes/no/on/off stay strings (`mixed_precision: no` is the string 'no'); and a number with an exponent
# but no dot (1e-4, 3E5) is a float, not a string. Every other scalar resolves as SafeLoader resolves it.
_BOOL = "tag:yaml.org,2002:bool"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_StrictLoader.add_implicit_resolver(  # tried after the int resolver, so 10 stays an integer
    "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """yaml.SafeDumper that also quotes text the loader would read as a float (a string '1e-4'); text that YAML 1.1
    reads as a boolean ('no') is quoted already, so files vqtok writes read the same with any YAML reader."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
YAML_1_1_BOOLEANS = frozenset({"yes", "no", "on", "off", "y", "n"})
"""Words YAML 1.1 reads as booleans (`ema: no`); vqtok's loader keeps them as text, and a true/false field given
one says to write true or false."""


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)


def save_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.dump(to_dict(config), Dumper=_Dumper, sort_keys=False))


def _convert(tp: Any, value: Any, *, path: str, source: str) -> Any:
    where = f"{source}: '{path or '<root>'}'"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path=path, source=source)
    if origin in (Union, types.UnionType):
        return _convert_union(args, value, path=path, source=source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {_show(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {_show(value)}")
        item_type = args[0]
        return tuple(_convert(item_type, v, path=f"{path}[{i}]", source=source) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, str) and value.lower() in YAML_1_1_BOOLEANS:
            raise ConfigError(f"{where} must be true or false, got {_show(value)}: vqtok reads YAML 1.2, where "
                              "yes/no/on/off are text; write true or false")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")  # a bug in a config class, not user input


def _convert_union(args: tuple[Any, ...], value: Any, *, path: str, source: str) -> Any:
    where = f"{source}: '{path or '<root>'}'"
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where} must not be null")
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # Optional[X]
        return _convert(options[0], value, path=path, source=source)
    dataclass_options = [a for a in options if dataclasses.is_dataclass(a)]
    if dataclass_options:  # a tagged union: the 'kind' key picks the dataclass (one without a 'kind' field, if
        # any, is what a mapping without the key means: the autoencoder in a training config's `model`)
        kinds = {a.__dataclass_fields__["kind"].default: a for a in dataclass_options if "kind" in a.__dataclass_fields__}
        untagged = [a for a in dataclass_options if "kind" not in a.__dataclass_fields__]
        if untagged and isinstance(value, dict) and "kind" not in value:
            return _convert_dataclass(untagged[0], value, path=path, source=source)
        if not isinstance(value, dict) or "kind" not in value:
            raise ConfigError(f"{where} must be a mapping with a 'kind' key, one of {sorted(kinds)}")
        if value["kind"] not in kinds:
            raise ConfigError(f"{where}.kind must be one of {sorted(kinds)}, got {value['kind']!r}")
        return _convert_dataclass(kinds[value["kind"]], value, path=path, source=source)
    raise TypeError(f"unsupported union {args!r} at {path}")


def _convert_dataclass(cls: Any, value: Any, *, path: str, source: str) -> Any:
    where = f"{source}: '{path or '<root>'}'"
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    not_text = [k for k in value if not isinstance(k, str)]
    if not_text:
        raise ConfigError(f"{where}: keys must be strings, got {not_text!r}")
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(repr(f'{path}.{k}' if path else k) for k in unknown)}; "
            f"allowed here: {sorted(fields)}"
        )
    kwargs = {
        name: _convert(hints[name], v, path=f"{path}.{name}" if path else name, source=source)
        for name, v in value.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as e:
        prefix = f"{path}." if path else ""
        raise ConfigError(f"{source}: {prefix}{e}") from None


# Configs that live beside their components, imported last, when every name they use from here exists. (Types in
# annotations are resolved when a config is parsed, by then.)
from vqtok.bottleneck.fsq import FSQConfig  # noqa: E402
from vqtok.bottleneck.lfq import LFQConfig  # noqa: E402
from vqtok.bottleneck.rvq import RVQConfig  # noqa: E402
from vqtok.models.hierarchical_vae import HierarchicalVAEConfig  # noqa: E402

BottleneckConfig = Union[GaussianConfig, VQConfig, FSQConfig, LFQConfig, RVQConfig]
"""What an autoencoder's `bottleneck` may be, by its `kind`: gaussian, vq, fsq, lfq or rvq."""

ModelConfig = Union[AutoencoderConfig, HierarchicalVAEConfig]
"""What a training config's `model` may be: an autoencoder's (no `kind` key) or a hierarchical VAE's."""
