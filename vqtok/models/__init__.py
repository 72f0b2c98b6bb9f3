"""Models saved in the Hub format: the autoencoder tokenizer and the transformer prior over its codes."""

from vqtok.models.autoencoder import Autoencoder, AutoencoderOutput
from vqtok.models.prior import PriorTokenizerMismatch, TransformerPrior

__all__ = ["Autoencoder", "AutoencoderOutput", "PriorTokenizerMismatch", "TransformerPrior"]
