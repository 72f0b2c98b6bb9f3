"""The tokenizer: encoder -> quant_conv -> bottleneck -> post_quant_conv -> decoder.

One class for every bottleneck. With a discrete one (VQ, FSQ, LFQ, residual VQ) `encode` gives integer codes
[B, h, w] ([B, h, w, depth] for a residual VQ, whose `decode` takes any prefix of the levels) and `decode` takes them; with a Gaussian one `encode` gives the posterior (`.sample()`, `.mode()`, `.kl()`) and `decode`
takes latents.
`encode(x, return_dict=True)` gives an `EncoderOutput` with everything at once (codes, the quantized vectors, the
features before quantization; or the posterior and a sample), `decode(..., return_dict=True)` a `DecoderOutput`;
the forward pass's `AutoencoderOutput` holds the loss terms (`.bottleneck.terms`, `.bottleneck.loss`).
The 1x1 `quant_conv`/`post_quant_conv` are the projections between the encoder/decoder width (`latent_channels`) and
the bottleneck's `dim` (a low-dimensional code space for the LlamaGen recipe); the layout is taming's and diffusers'.

A class-conditional autoencoder (`config.num_classes` N > 0; a CVAE when Gaussian) takes `labels=` in every method
that runs the encoder or the decoder: a label embedding is added to the encoder's conv_in output and another to the
decoder's conv_in output (vqtok.nn.conditioning). Label N is the null label (`null_class`), whose embeddings are
zero: labels=None means it, and gives exactly the unconditional network's outputs.
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
from vqtok.hub import TOKENIZER_LIMITATIONS, HubModel, indefinite_article
from vqtok.models.pixels import PixelModel
from vqtok.nn import Decoder, Encoder
from vqtok.nn.conditioning import Labels, label_tensor


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


@dataclass
class EncoderOutput:
    """What `Autoencoder.encode(x, return_dict=True)` gives.

    latents: VQ: the encoder's features before quantization [B, dim, h, w] (the quantizer's input; with
        l2_normalize the search compares their unit-norm directions); Gaussian: a sample of the posterior
        [B, dim, h, w] (drawn with `generator`; `posterior.mode()` is its mean).
    codes: VQ: the codes LongTensor [B, h, w] ([B, h, w, depth] for a residual VQ), what `encode` gives by default;
        Gaussian: None.
    quantized: VQ: the code vectors z_q of those codes [B, dim, h, w] in float32 (the decoder's input); Gaussian: None.
    posterior: Gaussian: the posterior q(z | x), a DiagonalGaussian (`.mean`, `.std`, `.mode()`, `.sample()`,
        `.kl()`), what `encode` gives by default; VQ: None.
    """

    latents: torch.Tensor
    codes: torch.Tensor | None = None
    quantized: torch.Tensor | None = None
    posterior: DiagonalGaussian | None = None


@dataclass
class DecoderOutput:
    """What `Autoencoder.decode(..., return_dict=True)` gives: `sample`, the images [B, C, H, W] in the model's
    range (the name diffusers uses)."""

    sample: torch.Tensor


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
    def is_conditional(self) -> bool:
        """Whether it is class-conditional (config.num_classes > 0): its methods then take `labels=`."""
        return self.config.num_classes > 0

    @property
    def null_class(self) -> int:
        """The null label, num_classes: the unconditional pass of a conditional model (what labels=None means)."""
        return self.config.num_classes

    def check_labels(self, labels: Labels, n: int) -> torch.Tensor | None:
        """`labels` for n images as a LongTensor [n] on the model's device (None stays None): one int for all, or
        one per image, in [0, num_classes]; a one-line ValueError names what is wrong (labels for an unconditional
        model, a float or bool type, a wrong shape, a value out of range)."""
        return label_tensor(labels, n, self.config.num_classes, self._device())

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    @property
    def vocab_size(self) -> int | None:
        """Codes per position (per level for a residual VQ); None for a Gaussian autoencoder."""
        return self.bottleneck.vocab_size

    @property
    def code_shape(self) -> tuple[int, ...] | None:
        """One image's codes: (h, w), or (h, w, depth) for a residual VQ (its levels fastest); None for a Gaussian
        autoencoder. What `encode` gives per image, a token store holds per view, and a prior models."""
        if self.vocab_size is None:
            return None
        depth = self.bottleneck.code_depth
        return tuple(self.config.latent_grid) + ((depth,) if depth is not None else ())

    # ------------------------------------------------------------------------------------------------------------
    # The pipeline

    def forward(self, x: torch.Tensor, generator: Noise = None, *, labels: Labels = None,
                check: bool = True) -> AutoencoderOutput:
        """Reconstruct x; the bottleneck samples (Gaussian, drawn with `generator`: see DiagonalGaussian.sample) or
        accumulates codebook statistics (VQ) in training. `labels`: each image's class (conditional models; one int
        for all, or [B]; None: the null label). `check=False` skips the checks that read values (finite pixels,
        labels in range), which wait for the device: for callers whose inputs are valid by construction (the
        training loop: images from uint8, labels checked on the host, a LongTensor [B] on the model's device)."""
        labels = self.check_labels(labels, x.shape[0]) if check else labels
        h = self._features(x, labels, check=check)
        out = self.bottleneck(h) if generator is None else self.bottleneck(h, generator=generator)
        return AutoencoderOutput(reconstruction=self._decode_z(out.z, labels), bottleneck=out)

    def encode(self, x: torch.Tensor, return_dict: bool = False, *, labels: Labels = None,
               generator: torch.Generator | None = None) -> Any:
        """Images in the model range [B, C, H, W] -> codes LongTensor [B, h, w] (VQ, FSQ; [B, h, w, depth] for a
        residual VQ) or the posterior (Gaussian).

        `labels`: each image's class, for a conditional model (one int for all, or [B]; None: the null label).
        `return_dict=True`: an `EncoderOutput` with the codes, their vectors and the features before quantization
        (VQ), or the posterior and a sample of it drawn with `generator` (Gaussian)."""
        features = self._features(x, self.check_labels(labels, x.shape[0]))
        encoded = self.bottleneck.encode(features)
        if not return_dict:
            return encoded
        if self.is_gaussian:
            return EncoderOutput(latents=encoded.sample(generator), posterior=encoded)
        return EncoderOutput(latents=features, codes=encoded, quantized=self.bottleneck.decode(encoded))

    def decode(self, representation: torch.Tensor, return_dict: bool = False, *,
               labels: Labels = None) -> torch.Tensor | DecoderOutput:
        """Codes [B, h, w] (VQ, FSQ; a residual VQ's [B, h, w, r], any prefix of its levels) or latents
        [B, dim, h, w] (Gaussian) -> images in the model range
        (`return_dict=True`: as a `DecoderOutput`'s `sample`). `labels`: the class to decode each as (conditional
        models; one int for all, or [B]; None: the null label)."""
        labels = self.check_labels(labels, representation.shape[0])
        images = self.to_image(self._decode_z(self.bottleneck.decode(representation), labels))
        return DecoderOutput(sample=images) if return_dict else images

    def code_length(self, x: torch.Tensor, generator: torch.Generator | None = None, *, labels: Labels = None,
                    output: AutoencoderOutput | None = None) -> dict[str, torch.Tensor]:
        """The negative ELBO's terms in nats per image [B] for a discrete pixel likelihood (Bernoulli on binary
        images, the logistic mixture on 8-bit ones): 'nll' = -log p(x | z) at one z ~ q(z | x) (the code, for VQ)
        and, for Gaussian models, 'kl' = KL(q(z | x) || N(0, I)) with beta 1 and no free bits. `output`, an
        eval-mode forward of the same x (with the same `labels`), saves encoding it again. Gaussian models also give
        'kl_groups' [B, 1] (the hierarchical VAE's signature). A conditional model's terms are those of
        p(x | y) with each image's label y (`labels`; None: the null label)."""
        self.discrete_likelihood()
        labels = self.check_labels(labels, x.shape[0])
        terms = {}
        if self.is_gaussian:
            posterior = (output.bottleneck.posterior if output is not None
                         else self.bottleneck.encode(self._features(x, labels)))
            params = self._decode_z(posterior.sample(generator), labels)
            terms["kl"] = posterior.kl().sum(dim=(1, 2, 3))
            terms["kl_groups"] = terms["kl"][:, None]  # one group
        elif output is not None:  # the decoder's output at the code already is -log p(x | z)'s parameters
            params = output.reconstruction
        else:
            params = self._decode_z(self.bottleneck.decode(self.bottleneck.encode(self._features(x, labels))), labels)
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
    def sample(self, n: int, *, labels: Labels = None, temperature: float = 1.0,
               seed: int | None = None) -> torch.Tensor:
        """n images (model range) decoded from latents drawn from the prior N(0, t^2 I) at the model's latent grid
        (Gaussian models). A conditional model (a CVAE) decodes them as `labels` (one class for all, or one per
        image; None: the null label, its unconditional pass): p(x | y) = E_z p(x | z, y), z ~ N(0, I). The latents
        depend on `seed` and n only, so the same seed with other labels gives the same z decoded as other classes."""
        if not self.is_gaussian:
            raise ValueError("a VQ tokenizer has no prior of its own; sample codes with a transformer prior")
        labels = self.check_labels(labels, n)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(n, self.bottleneck.dim, *self.config.latent_grid, generator=generator) * temperature
        return self.decode(z.to(self._device()), labels=labels)

    def log_weights(self, x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None, *,
                    labels: Labels = None) -> torch.Tensor:
        """Importance log-weights log p(x, z_i) - log q(z_i | x) [B, num_samples] of a Gaussian model with a discrete
        pixel likelihood, z_i ~ q(z | x) (the IWAE bound's terms), in float32 (float64 stays float64). A
        conditional model's are those of p(x, z | y) / q(z | x, y) with each image's label y (`labels`)."""
        if not self.is_gaussian:
            raise ValueError("importance weights need a Gaussian (VAE) tokenizer")
        self.discrete_likelihood()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        labels = self.check_labels(labels, x.shape[0])
        posterior = self.bottleneck.encode(self._features(x, labels))
        b = x.shape[0]
        mean, logvar = (t.repeat_interleave(num_samples, dim=0) for t in (posterior.mean, posterior.logvar))
        q = DiagonalGaussian(mean, logvar)
        z = q.sample(generator)
        prior = DiagonalGaussian(torch.zeros_like(mean), torch.zeros_like(logvar))
        log_pz_minus_log_qz = (prior.log_prob(z) - q.log_prob(z)).flatten(1).sum(dim=1)
        repeated = labels.repeat_interleave(num_samples) if labels is not None else None
        log_px = -self.pixel_nll(self._decode_z(z, repeated), x.repeat_interleave(num_samples, dim=0))
        return (log_px + log_pz_minus_log_qz).view(b, num_samples)

    def on_optimizer_step(self, skipped: bool | torch.Tensor = False) -> dict[str, torch.Tensor]:
        """The once-per-optimizer-step hook of the bottleneck (EMA codebook, restarts); see `Bottleneck`."""
        return self.bottleneck.on_optimizer_step(skipped=skipped)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as a diffusion model trained on them expects: (z - shift_factor) * scaling_factor (the config's;
        the identity for vqtok's own models). `encode` never applies it."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale_latents`: z / scaling_factor + shift_factor, what `decode` takes."""
        return z / self.config.scaling_factor + self.config.shift_factor

    def _features(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
        """The bottleneck's input; `labels` checked already (`check_labels`); `check=False`: see `forward`."""
        self.check_images(x, values=check)
        with self._precision():
            return self.quant_conv(self.encoder(x.to(self.encoder.conv_in.weight.dtype), labels))

    def _decode_z(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's output at the bottleneck's output z; `labels` checked already (`check_labels`)."""
        with self._precision():
            return self.decoder(self.post_quant_conv(z.to(self.decoder.conv_in.weight.dtype)), labels)

    def _precision(self) -> contextlib.AbstractContextManager:
        """With `force_upcast` (a VAE that overflows in half precision), autocast is turned off: the model runs in
        its weights' dtype, float32 unless the user cast them."""
        if not self.config.force_upcast:
            return contextlib.nullcontext()
        return torch.autocast(self.encoder.conv_in.weight.device.type, enabled=False)

    def check_images(self, x: torch.Tensor, *, values: bool = True) -> None:
        """Clear errors for what the convolutions would otherwise reject obscurely (or silently accept); `values`:
        see `check_input`."""
        self.check_input(x, values=values)
        f = self.downsampling_factor
        height, width = x.shape[-2:]
        if height % f or width % f or height == 0 or width == 0:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsampling factor {f}; "
                f"resize or crop to a multiple of {f}"
            )

    # ------------------------------------------------------------------------------------------------------------
    # The model card (see HubModel.generate_model_card)

    @property
    def is_generative(self) -> bool:
        """Whether sampling its own prior is a use of this model: a Gaussian autoencoder trained by vqtok with KL
        weight beta = 1 (the ELBO: a VAE proper). A latent tokenizer (beta < 1) or a converted one is not."""
        return self.is_gaussian and self.config.converted_from is None and self.config.bottleneck.beta == 1.0

    def card_defaults(self, load: str) -> dict[str, Any]:
        """The tokenizer's card: VQ (discrete codes) or Gaussian (latents), class-conditional or not; a converted
        tokenizer's names the original, whose licence applies."""
        c, origin = self.config, self.config.converted_from
        grid, b = "x".join(str(n) for n in c.latent_grid), c.bottleneck
        given = ", labels=y" if self.is_conditional else ""  # a conditional model's calls take each image's class
        encoded = (f"posterior = tok.encode(x{given})  # q(z | x): .mode() its mean, .sample() a draw\n"
                   "z = posterior.mode()")
        if not self.is_gaussian:
            shape = "B, h, w" + (f", {b.depth}" if b.kind == "rvq" else "")
            encoded = f"codes = tok.encode(x{given})  # LongTensor [{shape}], values in [0, {self.vocab_size})"
        if self.is_conditional:
            encoded = (f"y = [3] * len(x)  # each image's class in [0, {c.num_classes}); labels=None (or "
                       f"{c.num_classes}, the null label) is the unconditional pass\n{encoded}")
        usage = (f"import vqtok\n\ntok = {load}\nx = tok.preprocess(images)  # PIL images or uint8 arrays -> [B, C, H, "
                 f"W] in the model's range\n{encoded}\nreconstructions = tok.postprocess(tok.decode("
                 f"{'z' if self.is_gaussian else 'codes'}{given}), output_type=\"pil\")")
        if c.scaling_factor != 1.0 or c.shift_factor != 0.0:
            usage += "\nlatents = tok.scale_latents(z)  # what a latent diffusion model trained on it takes"
        if self.is_generative and self.is_conditional:
            usage += ("\nsamples = tok.postprocess(tok.sample(16, labels=3, seed=0), output_type=\"pil\")  # class 3, "
                      "from its own prior")
        elif self.is_generative:
            usage += "\nsamples = tok.postprocess(tok.sample(16, seed=0), output_type=\"pil\")  # its own prior"
        if self.is_gaussian:
            description = "Gaussian (KL) image autoencoder"
            what = f"{c.resolution}x{c.resolution} images become latents of {b.dim} channels on a {grid} grid"
            use = ("Compressing images into continuous latents for latent generative models (diffusion, flow "
                   "matching) and decoding theirs back into images; research on image autoencoders.")
        else:
            name, detail = "VQ", ""
            if b.kind == "fsq":
                name, detail = "FSQ", f" (levels {list(b.levels)})"
            elif b.kind == "lfq":
                name, detail = "BSQ" if b.spherical else "LFQ", f" ({b.bits} bits)"
            elif b.kind == "rvq":
                name = "residual VQ"
                detail = (f", {b.depth} residual levels per position (codes [{grid.replace('x', ', ')}, {b.depth}], "
                          "coarse to fine)")
            description = f"{name} image tokenizer"
            what = (f"{c.resolution}x{c.resolution} images become {grid} grids of codes from a vocabulary of "
                    f"{self.vocab_size:,}{detail}")
            use = ("Turning images into grids of discrete codes, to train and sample generative models over codes "
                   "(an autoregressive transformer such as `vqtok train-prior`'s, a masked model), and decoding codes "
                   "back into images; research on image tokenizers.")
        limitations = TOKENIZER_LIMITATIONS
        if not self.is_gaussian:
            limitations += (" Codes mean something only to this tokenizer: a prior trained on them records its "
                            "weights' hash and refuses another.")
        if self.is_generative:
            use += " As a VAE it also samples images from its own prior (`tok.sample`, `vqtok sample --model`)."
        if self.is_conditional:
            description = f"class-conditional {description}"
            what += f", given each image's class (one of {c.num_classes}; label {c.num_classes} is the null label)"
            use += " It is class-conditional: encode and decode take each image's class (`labels=`)"
            use += (", and it samples images of a chosen class (`vqtok sample --model DIR --class C`)."
                    if self.is_generative else ".")
        card = {
            "description": description,
            "intro": f"{indefinite_article(description).capitalize()} {description} made with "
                     f"[vqtok](https://github.com/vqtok/vqtok): {what}, and back.",
            "tags": ["image-tokenizer", {"gaussian": "vae", "vq": "vq-vae"}.get(b.kind, b.kind)]
                    + (["class-conditional"] if self.is_conditional else []),
            "pipeline_tag": "unconditional-image-generation" if self.is_generative else None,
            "usage": usage,
            "intended_use": use,
            "limitations": limitations,
        }
        if origin is not None:
            where = f"`{origin.source}`" + (f" at {origin.revision}" if origin.revision else "")
            name = origin.class_name or "tokenizer"
            card.update(
                title=f"{name} converted from {origin.format}",
                intro=f"The {origin.format} {name} {where}, converted to [vqtok](https://github.com/vqtok/vqtok)'s "
                      f"format: the same weights, run by vqtok's modules ({what}). The original's licence applies.",
                intended_use=f"The original's: encoding images for the generative models trained on its "
                             f"{'latents' if self.is_gaussian else 'codes'} and decoding theirs, run by vqtok.",
                limitations="The weights are the original's, converted; vqtok's tests compare its modules with the "
                            "original library's. The original's licence, limitations and intended uses apply: see "
                            "its model card.",
            )
            if origin.license:
                card["license"] = origin.license
        return card

    def card_facts(self) -> dict[str, Any]:
        """The card's facts; a converted tokenizer's first name the original, its weights' hash and its licence; a
        class-conditional one's end with its classes."""
        origin, facts = self.config.converted_from, {}
        if origin is not None:
            where = f"`{origin.source}`" + (f" at {origin.revision}" if origin.revision else "")
            facts = {"converted from": f"{origin.format} {origin.class_name or 'checkpoint'} {where}",
                     "original weights sha256": origin.weights_sha256, "licence of the original": origin.license}
        facts = {**{k: v for k, v in facts.items() if v}, **super().card_facts()}
        if self.is_conditional:
            facts["classes"] = f"{self.config.num_classes} (label {self.null_class}: the null label, unconditional)"
        return facts

    def derived_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "downsampling_factor": c.downsampling_factor,
            "latent_grid": list(c.latent_grid),
            "latent_dim": self.bottleneck.dim,
            "vocab_size": self.vocab_size,
            "value_range": list(c.value_range),
        }
