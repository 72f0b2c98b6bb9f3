"""The tokenizer: encoder -> quant_conv -> bottleneck -> post_quant_conv -> decoder.

One class for every bottleneck. With a VQ bottleneck `encode` gives integer codes [B, h, w] and `decode` takes them;
with a Gaussian one `encode` gives the posterior (`.sample()`, `.mode()`, `.kl()`) and `decode` takes latents.
The 1x1 `quant_conv`/`post_quant_conv` are the projections between the encoder/decoder width (`latent_channels`) and
the bottleneck's `dim` (a low-dimensional code space for the LlamaGen recipe); the layout is taming's and diffusers'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vqtok.bottleneck import Bottleneck, BottleneckOutput, build_bottleneck
from vqtok.config import AutoencoderConfig
from vqtok.hub import HubModel
from vqtok.images import ImageInput, range_to_uint8, resize_and_crop, to_pil, to_uint8_batch, uint8_to_range
from vqtok.losses import DISCRETE_LIKELIHOODS, mixture_channels, mixture_mode_image, nll_per_image
from vqtok.nn import Decoder, Encoder


@dataclass
class AutoencoderOutput:
    """reconstruction: the decoder's output [B, C', H, W] (an image in the model's range, or Bernoulli logits or
    logistic-mixture parameters when config.decoder_output says so: `Autoencoder.to_image` turns any into an
    image); bottleneck: its output."""

    reconstruction: torch.Tensor
    bottleneck: BottleneckOutput

    @property
    def loss(self) -> torch.Tensor:
        """The bottleneck's weighted regulariser (add a reconstruction loss to train)."""
        return self.bottleneck.loss


class Autoencoder(HubModel, model_type="autoencoder"):
    """An image tokenizer: VQ (discrete codes) or Gaussian (VAE latents), saved and loaded in the Hub format."""

    config_class = AutoencoderConfig
    derived_keys = ("downsampling_factor", "latent_grid", "latent_dim", "vocab_size", "value_range")

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.bottleneck: Bottleneck = build_bottleneck(config.bottleneck)
        encoder_out = config.latent_channels * (2 if self.is_gaussian else 1)  # taming/diffusers' double_z
        self.encoder = Encoder(config, out_channels=encoder_out)
        self.quant_conv = nn.Conv2d(encoder_out, self.bottleneck.in_channels, 1)
        self.post_quant_conv = nn.Conv2d(self.bottleneck.dim, config.latent_channels, 1)
        out_channels = (mixture_channels(config.num_mixtures, config.in_channels)
                        if config.decoder_output == "logistic_mixture" else config.in_channels)
        self.decoder = Decoder(config, in_channels=config.latent_channels, out_channels=out_channels)

    @property
    def is_gaussian(self) -> bool:
        return self.config.bottleneck.kind == "gaussian"

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    @property
    def vocab_size(self) -> int | None:
        return self.bottleneck.vocab_size

    # ------------------------------------------------------------------------------------------------------------
    # Images <-> model range

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """PIL image(s) or uint8 arrays/tensors -> float [B, C, H, W] in the model's input range, on its device,
        resized and cropped as recorded in the config (`config.preprocess`)."""
        batch = to_uint8_batch(images, self.config.in_channels)
        batch = resize_and_crop(batch, self.config.preprocess.resize, self.config.preprocess.crop)
        return uint8_to_range(batch.to(self._device()), self.config.value_range)

    def postprocess(self, x: torch.Tensor, output_type: str = "uint8") -> torch.Tensor | list[Any]:
        """Model-range images -> uint8 [B, C, H, W] (rounded, clipped), or a list of PIL images with 'pil'."""
        if output_type not in ("uint8", "pil"):
            raise ValueError(f"output_type must be 'uint8' or 'pil', got {output_type!r}")
        batch = range_to_uint8(x, self.config.value_range)
        return to_pil(batch) if output_type == "pil" else batch

    # ------------------------------------------------------------------------------------------------------------
    # The pipeline

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        """Reconstruct x; the bottleneck samples (Gaussian) or accumulates codebook statistics (VQ) in training."""
        out = self.bottleneck(self._features(x))
        return AutoencoderOutput(reconstruction=self._decode_z(out.z), bottleneck=out)

    def encode(self, x: torch.Tensor) -> Any:
        """Images in the model range [B, C, H, W] -> codes LongTensor [B, h, w] (VQ) or the posterior (Gaussian)."""
        return self.bottleneck.encode(self._features(x))

    def decode(self, representation: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] (VQ) or latents [B, dim, h, w] (Gaussian) -> images in the model range."""
        return self.to_image(self._decode_z(self.bottleneck.decode(representation)))

    def to_image(self, decoder_output: torch.Tensor) -> torch.Tensor:
        """The decoder's output as an image in the model range: itself, the mean (sigmoid) of Bernoulli logits, or
        the centre of each pixel's most probable logistic component."""
        kind = self.config.decoder_output
        if kind == "bernoulli_logits":
            return torch.sigmoid(decoder_output)
        if kind == "logistic_mixture":
            return mixture_mode_image(decoder_output, self.config.num_mixtures, self.config.in_channels)
        return decoder_output

    def code_length(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
                    output: AutoencoderOutput | None = None) -> dict[str, torch.Tensor]:
        """The negative ELBO's terms in nats per image [B] for a discrete pixel likelihood (Bernoulli on binary
        images, the logistic mixture on 8-bit ones): 'nll' = -log p(x | z) at one z ~ q(z | x) (the code, for VQ)
        and, for Gaussian models, 'kl' = KL(q(z | x) || N(0, I)) with beta 1 and no free bits. `output`, an
        eval-mode forward of the same x, saves encoding it again."""
        kind = DISCRETE_LIKELIHOODS.get(self.config.decoder_output)
        if kind is None:
            raise ValueError(f"decoder_output {self.config.decoder_output!r} is not a discrete likelihood: no code length")
        terms = {}
        if self.is_gaussian:
            posterior = output.bottleneck.posterior if output is not None else self.bottleneck.encode(self._features(x))
            params = self._decode_z(posterior.sample(generator))
            terms["kl"] = posterior.kl().sum(dim=(1, 2, 3))
        elif output is not None:  # the decoder's output at the code already is -log p(x | z)'s parameters
            params = output.reconstruction
        else:
            params = self._decode_z(self.bottleneck.decode(self.bottleneck.encode(self._features(x))))
        terms["nll"] = nll_per_image(kind, params, x)
        return terms

    def on_optimizer_step(self, skipped: bool = False) -> dict[str, torch.Tensor]:
        """The once-per-optimizer-step hook of the bottleneck (EMA codebook, restarts); see `Bottleneck`."""
        return self.bottleneck.on_optimizer_step(skipped=skipped)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_images(x)
        return self.quant_conv(self.encoder(x.to(self.encoder.conv_in.weight.dtype)))

    def _decode_z(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def check_images(self, x: torch.Tensor) -> None:
        """Clear errors for what the convolutions would otherwise reject obscurely (or silently accept)."""
        c, f = self.config.in_channels, self.downsampling_factor
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(
                f"expected a float tensor [B, {c}, H, W] in the model's range {self.config.value_range}, got "
                f"{getattr(x, 'dtype', type(x).__name__)}; use preprocess() for uint8 or PIL images"
            )
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"expected images [B, {c}, H, W], got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % f or width % f or height == 0 or width == 0:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsampling factor {f}; "
                f"resize or crop to a multiple of {f}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("input images contain NaN or infinite values")

    def _device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def derived_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "downsampling_factor": c.downsampling_factor,
            "latent_grid": list(c.latent_grid),
            "latent_dim": self.bottleneck.dim,
            "vocab_size": self.vocab_size,
            "value_range": list(c.value_range),
        }
