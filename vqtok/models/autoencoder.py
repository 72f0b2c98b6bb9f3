"""The tokenizer: encoder -> quant_conv -> bottleneck -> post_quant_conv -> decoder.

One class for every bottleneck. With a VQ bottleneck `encode` gives integer codes [B, h, w] and `decode` takes them;
with a Gaussian one `encode` gives the posterior (`.sample()`, `.mode()`, `.kl()`) and `decode` takes latents.
The 1x1 `quant_conv`/`post_quant_conv` are the projections between the encoder/decoder width (`latent_channels`) and
the bottleneck's `dim` (a low-dimensional code space for the LlamaGen recipe); the layout is taming's and diffusers'.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vqtok.bottleneck import Bottleneck, BottleneckOutput, DiagonalGaussian, build_bottleneck
from vqtok.bottleneck.gaussian import Noise
from vqtok.bottleneck.kl import KLObjective
from vqtok.config import AutoencoderConfig
from vqtok.hub import HubModel
from vqtok.models.pixels import PixelModel
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


class Autoencoder(PixelModel, HubModel, model_type="autoencoder"):
    """An image tokenizer: VQ (discrete codes) or Gaussian (VAE latents), saved and loaded in the Hub format."""

    config_class = AutoencoderConfig
    derived_keys = ("downsampling_factor", "latent_grid", "latent_dim", "vocab_size", "value_range")

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.bottleneck: Bottleneck = build_bottleneck(config.bottleneck)
        encoder_out = config.latent_channels * (2 if self.is_gaussian else 1)  # taming/diffusers' double_z
        self.encoder = Encoder(config, out_channels=encoder_out)
        self.quant_conv = (nn.Conv2d(encoder_out, self.bottleneck.in_channels, 1) if config.use_quant_conv
                           else nn.Identity())
        self.post_quant_conv = (nn.Conv2d(self.bottleneck.dim, config.latent_channels, 1) if config.use_post_quant_conv
                                else nn.Identity())
        self.decoder = Decoder(config, in_channels=config.latent_channels, out_channels=self.output_channels())

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
    # The pipeline

    def forward(self, x: torch.Tensor, generator: Noise = None) -> AutoencoderOutput:
        """Reconstruct x; the bottleneck samples (Gaussian, drawn with `generator`: see DiagonalGaussian.sample) or
        accumulates codebook statistics (VQ) in training."""
        h = self._features(x)
        out = self.bottleneck(h) if generator is None else self.bottleneck(h, generator=generator)
        return AutoencoderOutput(reconstruction=self._decode_z(out.z), bottleneck=out)

    def encode(self, x: torch.Tensor) -> Any:
        """Images in the model range [B, C, H, W] -> codes LongTensor [B, h, w] (VQ) or the posterior (Gaussian)."""
        return self.bottleneck.encode(self._features(x))

    def decode(self, representation: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] (VQ) or latents [B, dim, h, w] (Gaussian) -> images in the model range."""
        return self.to_image(self._decode_z(self.bottleneck.decode(representation)))

    def code_length(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
                    output: AutoencoderOutput | None = None) -> dict[str, torch.Tensor]:
        """The negative ELBO's terms in nats per image [B] for a discrete pixel likelihood (Bernoulli on binary
        images, the logistic mixture on 8-bit ones): 'nll' = -log p(x | z) at one z ~ q(z | x) (the code, for VQ)
        and, for Gaussian models, 'kl' = KL(q(z | x) || N(0, I)) with beta 1 and no free bits. `output`, an
        eval-mode forward of the same x, saves encoding it again. Gaussian models also give 'kl_groups' [B, 1] (the
        hierarchical VAE's signature)."""
        self.discrete_likelihood()
        terms = {}
        if self.is_gaussian:
            posterior = output.bottleneck.posterior if output is not None else self.bottleneck.encode(self._features(x))
            params = self._decode_z(posterior.sample(generator))
            terms["kl"] = posterior.kl().sum(dim=(1, 2, 3))
            terms["kl_groups"] = terms["kl"][:, None]  # one group
        elif output is not None:  # the decoder's output at the code already is -log p(x | z)'s parameters
            params = output.reconstruction
        else:
            params = self._decode_z(self.bottleneck.decode(self.bottleneck.encode(self._features(x))))
        terms["nll"] = self.pixel_nll(params, x)
        return terms

    @property
    def kl_objective(self) -> KLObjective | None:
        """The KL regulariser of a Gaussian bottleneck (beta, free bits per latent element), None for VQ."""
        return self.bottleneck.kl_objective if self.is_gaussian else None

    def regularisation(self, out: AutoencoderOutput, *, kl_weight: float = 1.0,
                       step_kl_mean: torch.Tensor | None = None) -> torch.Tensor:
        """The training objective's non-reconstruction part: kl_weight x the KL objective over the optimizer step's
        batch (Gaussian; `step_kl_mean` is the step's average KL per unit, None: this batch's), or the quantizer's
        commitment and codebook terms (VQ)."""
        if not self.is_gaussian:
            return out.bottleneck.loss
        return self.kl_objective.loss(out.bottleneck.kl_units, step_kl_mean, kl_weight=kl_weight)

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, seed: int | None = None) -> torch.Tensor:
        """n images (model range) decoded from latents drawn from the prior N(0, t^2 I) at the model's latent grid
        (Gaussian models)."""
        if not self.is_gaussian:
            raise ValueError("a VQ tokenizer has no prior of its own; sample codes with a transformer prior")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(n, self.bottleneck.dim, *self.config.latent_grid, generator=generator) * temperature
        return self.decode(z.to(self._device()))

    def log_weights(self, x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance log-weights log p(x, z_i) - log q(z_i | x) [B, num_samples] of a Gaussian model with a discrete
        pixel likelihood, z_i ~ q(z | x) (the IWAE bound's terms), in float32 (float64 stays float64)."""
        if not self.is_gaussian:
            raise ValueError("importance weights need a Gaussian (VAE) tokenizer")
        self.discrete_likelihood()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        posterior = self.bottleneck.encode(self._features(x))
        b = x.shape[0]
        mean, logvar = (t.repeat_interleave(num_samples, dim=0) for t in (posterior.mean, posterior.logvar))
        q = DiagonalGaussian(mean, logvar)
        z = q.sample(generator)
        prior = DiagonalGaussian(torch.zeros_like(mean), torch.zeros_like(logvar))
        log_pz_minus_log_qz = (prior.log_prob(z) - q.log_prob(z)).flatten(1).sum(dim=1)
        log_px = -self.pixel_nll(self._decode_z(z), x.repeat_interleave(num_samples, dim=0))
        return (log_px + log_pz_minus_log_qz).view(b, num_samples)

    def on_optimizer_step(self, skipped: bool = False) -> dict[str, torch.Tensor]:
        """The once-per-optimizer-step hook of the bottleneck (EMA codebook, restarts); see `Bottleneck`."""
        return self.bottleneck.on_optimizer_step(skipped=skipped)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as a diffusion model trained on them expects: (z - shift_factor) * scaling_factor (the config's;
        the identity for vqtok's own models). `encode` never applies it."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale_latents`: z / scaling_factor + shift_factor, what `decode` takes."""
        return z / self.config.scaling_factor + self.config.shift_factor

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_images(x)
        with self._precision():
            return self.quant_conv(self.encoder(x.to(self.encoder.conv_in.weight.dtype)))

    def _decode_z(self, z: torch.Tensor) -> torch.Tensor:
        with self._precision():
            return self.decoder(self.post_quant_conv(z.to(self.decoder.conv_in.weight.dtype)))

    def _precision(self) -> contextlib.AbstractContextManager:
        """With `force_upcast` (a VAE that overflows in half precision), autocast is turned off: the model runs in
        its weights' dtype, float32 unless the user cast them."""
        if not self.config.force_upcast:
            return contextlib.nullcontext()
        return torch.autocast(self.encoder.conv_in.weight.device.type, enabled=False)

    def check_images(self, x: torch.Tensor) -> None:
        """Clear errors for what the convolutions would otherwise reject obscurely (or silently accept)."""
        self.check_input(x)
        f = self.downsampling_factor
        height, width = x.shape[-2:]
        if height % f or width % f or height == 0 or width == 0:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsampling factor {f}; "
                f"resize or crop to a multiple of {f}"
            )

    def generate_model_card(self, *args: Any, **kwargs: Any):
        """vqtok's card; a converted tokenizer's names the original, its weights' hash and its licence."""
        origin = self.config.converted_from
        if origin is None:
            return super().generate_model_card(*args, **kwargs)
        where = f"`{origin.source}`" + (f" at {origin.revision}" if origin.revision else "")
        kwargs.setdefault("title", f"{origin.class_name or 'tokenizer'} converted from {origin.format}")
        kwargs.setdefault("intro", f"The {origin.format} {origin.class_name or 'tokenizer'} {where}, converted to "
                                   "[vqtok](https://github.com/vqtok/vqtok)'s format: the same weights, run by vqtok's "
                                   "modules. The original's licence applies.")
        card = super().generate_model_card(*args, **kwargs)
        extra = {"converted from": f"{origin.format} {origin.class_name or 'checkpoint'} {where}",
                 "original weights sha256": origin.weights_sha256, "licence of the original": origin.license}
        rows = "".join(f"| {k} | {v} |\n" for k, v in extra.items() if v)
        card.text = card.text.replace("|---|---|\n", "|---|---|\n" + rows, 1)
        if origin.license:
            card.data.license = origin.license
        return card

    def derived_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "downsampling_factor": c.downsampling_factor,
            "latent_grid": list(c.latent_grid),
            "latent_dim": self.bottleneck.dim,
            "vocab_size": self.vocab_size,
            "value_range": list(c.value_range),
        }
