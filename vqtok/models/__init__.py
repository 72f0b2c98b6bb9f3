"""Models saved in the Hub format: the autoencoder tokenizer, the transformer prior over its codes, and the
PatchGAN discriminator a VQGAN-style run trains beside the tokenizer."""

from vqtok.models.autoencoder import Autoencoder, AutoencoderOutput, DecoderOutput, EncoderOutput
from vqtok.models.discriminator import PatchDiscriminator
from vqtok.models.hierarchical_vae import HierarchicalVAE, HierarchicalVAEConfig, HierarchicalVAEOutput
from vqtok.models.prior import PriorTokenizerMismatch, TransformerPrior

__all__ = ["Autoencoder", "AutoencoderOutput", "DecoderOutput", "EncoderOutput", "HierarchicalVAE",
           "HierarchicalVAEConfig", "HierarchicalVAEOutput", "PatchDiscriminator", "PriorTokenizerMismatch",
           "TransformerPrior"]
