"""The VQGAN terms of a tokenizer run (Esser et al. 2021): an LPIPS perceptual loss, and a PatchGAN discriminator
with its own optimizer, switched on at `adversarial.start_step`, its term balanced by the adaptive weight.

Per micro-batch the tokenizer's loss gains `perceptual.weight * LPIPS(x, x_hat)` and, once the discriminator is on,
`lambda * L_G(D(x_hat))` (the discriminator frozen for that pass); then the discriminator takes its own backward on
real and reconstructed images (detached). The discriminator always sees reals and reconstructions in one batch - in
its own pass (one forward, so DDP sees one pass) and in the tokenizer's - so that its BatchNorm statistics, and so
the function it computes, are the same in both. After the tokenizer's update the discriminator steps. lambda is
computed from each process's own gradients (as in taming), per micro-batch. Both models are in Accelerate's
checkpoints; the export writes `discriminator/` beside `tokenizer/`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator

from vqtok.config import ConfigError, TrainConfig, to_dict
from vqtok.losses import adaptive_gan_weight, discriminator_loss, generator_loss
from vqtok.models import Autoencoder
from vqtok.models.discriminator import PatchDiscriminator
from vqtok.nn.perceptual import LPIPS
from vqtok.train.engine import grad_norm_of, make_adamw, step_unless, takes_device_skip


class ImageLosses:
    """The perceptual and adversarial terms of one run (either may be absent) and the discriminator's training."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator, tokenizer: Autoencoder):
        self.config, self.accelerator = config, accelerator
        self.tokenizer = tokenizer  # its decoder's last layer is where the adaptive weight compares gradients
        self.perceptual = (LPIPS.from_file(config.perceptual.weights, map_location=accelerator.device)
                           if config.perceptual is not None else None)
        self.adversarial = config.adversarial
        self.discriminator = self.optimizer = None
        if self.adversarial is not None:
            self.raw: PatchDiscriminator = build_discriminator(config)
            self.discriminator = self.raw
            self.optimizer = make_adamw(self.raw.parameters(), lr=self.adversarial.lr or config.lr,
                                        betas=self.adversarial.betas, weight_decay=0.0)

    def prepare(self) -> None:
        """Hand the discriminator and its optimizer to Accelerate (device, DDP, checkpoints), after the tokenizer's,
        so that a checkpoint's first model is the tokenizer whether or not the run has a discriminator."""
        if self.adversarial is not None:
            self.discriminator, self.optimizer = self.accelerator.prepare(self.raw, self.optimizer)
            self.raw = self.accelerator.unwrap_model(self.discriminator)

    def active(self, step: int) -> bool:
        """Whether the discriminator trains and the adversarial term counts at optimizer step `step`."""
        return self.adversarial is not None and step >= self.adversarial.start_step

    def generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, reconstruction: torch.Tensor, step: int
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """reconstruction + the perceptual term + the weighted adversarial term, and those terms for the logs."""
        logs: dict[str, torch.Tensor] = {}
        loss = reconstruction
        if self.perceptual is not None:
            with self.accelerator.autocast():
                perceptual = self.perceptual(*self._minus_one_to_one(x, x_hat)).mean()
            loss = loss + self.config.perceptual.weight * perceptual
            logs["perceptual"] = perceptual.detach()
        if self.active(step):
            adversarial = self.adversarial
            self.raw.requires_grad_(False)  # the tokenizer's pass: gradients reach x_hat only
            try:
                with self.accelerator.autocast():
                    g_loss = generator_loss(adversarial.loss, self.raw(torch.cat([x, x_hat])).chunk(2)[1])
            finally:
                self.raw.requires_grad_(True)
            weight = torch.full((), adversarial.weight, device=x.device)  # (a fill: no host-to-device copy)
            if adversarial.adaptive_weight:
                weight = weight * adaptive_gan_weight(loss, g_loss, self.tokenizer.decoder.conv_out.weight,
                                                      max_weight=adversarial.max_adaptive_weight)
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss.detach(), gan_weight=weight)
        return loss, logs

    def _minus_one_to_one(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """LPIPS' input range, [-1, 1], from the tokenizer's."""
        if self.tokenizer.config.value_range == (-1.0, 1.0):
            return images
        return tuple(2 * image - 1 for image in images)

    def discriminator_backward(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The discriminator's loss on real and (detached) reconstructed images, backpropagated / grad_accum."""
        with self.accelerator.autocast():
            logits = self.discriminator(torch.cat([x, x_hat.detach()]))
        real, fake = logits.chunk(2)
        loss = discriminator_loss(self.adversarial.loss, real, fake)
        self.accelerator.backward(loss / self.config.grad_accum)
        return {"d_loss": loss.detach(), "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}

    def discriminator_step(self) -> dict[str, torch.Tensor | float]:
        """Clip, then update - or skip when the gradient norm is not finite (the tokenizer's step decides its own),
        decided on the device like the tokenizer's (engine.step_unless); under fp16 the GradScaler's step skips an
        overflow itself, and without a fused kernel the decision is read on the host."""
        grad_norm = grad_norm_of(self.accelerator, self.discriminator.parameters(), self.config.clip_grad_norm)
        if self.accelerator.scaler is None and takes_device_skip(self.optimizer):
            step_unless(self.optimizer, ~torch.isfinite(grad_norm))
        elif self.accelerator.scaler is not None or math.isfinite(float(grad_norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"d_grad_norm": grad_norm}

    def no_sync(self):
        return self.accelerator.no_sync(self.discriminator)

    def save(self, folder: Path) -> None:
        """The discriminator in the Hub format (config.json + model.safetensors), if there is one."""
        if self.adversarial is not None:
            self.raw.save_pretrained(folder)


def build_discriminator(config: TrainConfig) -> PatchDiscriminator:
    """A fresh discriminator, or the one `adversarial.init_from` names (its config must be the run's)."""
    adversarial = config.adversarial
    if adversarial.init_from is None:
        return PatchDiscriminator(adversarial.discriminator)
    loaded = PatchDiscriminator.from_pretrained(adversarial.init_from)
    if loaded.config != adversarial.discriminator:
        raise ConfigError(f"adversarial.init_from {adversarial.init_from!r} holds a discriminator with config "
                          f"{to_dict(loaded.config)}, but adversarial.discriminator is {to_dict(adversarial.discriminator)}")
    return loaded.train()
