"""Models saved in the Hub format: the autoencoder tokenizer (and, later, hierarchical stacks and priors)."""

from vqtok.models.autoencoder import Autoencoder, AutoencoderOutput

__all__ = ["Autoencoder", "AutoencoderOutput"]
