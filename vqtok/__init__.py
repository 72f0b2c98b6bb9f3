"""vqtok: image tokenizers (VQ and Gaussian autoencoders) for generative transformers, in the Hugging Face format.

    tok = vqtok.load("org/name")             # or a local folder
    codes = tok.encode(tok.preprocess(images))
    images = tok.postprocess(tok.decode(codes))
    prior = vqtok.load("org/prior")          # a transformer prior over a tokenizer's codes
    codes = prior.generate(16, labels=3, cfg_scale=2.0, seed=0)
"""

from vqtok.config import (
    AutoencoderConfig,
    ConfigError,
    FSQConfig,
    GaussianConfig,
    LFQConfig,
    PriorConfig,
    RVQConfig,
    VQConfig,
    load_yaml,
)
from vqtok.data import TokenDataset, encode_dataset
from vqtok.hub import load
from vqtok.models import (
    Autoencoder,
    AutoencoderOutput,
    DecoderOutput,
    EncoderOutput,
    HierarchicalVAE,
    HierarchicalVAEConfig,
    PriorTokenizerMismatch,
    TransformerPrior,
)
from vqtok.version import __version__

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "AutoencoderOutput",
    "ConfigError",
    "DecoderOutput",
    "EncoderOutput",
    "FSQConfig",
    "GaussianConfig",
    "HierarchicalVAE",
    "HierarchicalVAEConfig",
    "LFQConfig",
    "PriorConfig",
    "PriorTokenizerMismatch",
    "RVQConfig",
    "TokenDataset",
    "TransformerPrior",
    "VQConfig",
    "__version__",
    "encode_dataset",
    "load",
    "load_yaml",
]
