"""vqtok: image tokenizers (VQ and Gaussian autoencoders) for generative transformers, in the Hugging Face format.

    tok = vqtok.load("org/name")             # or a local folder
    codes = tok.encode(tok.preprocess(images))
    images = tok.postprocess(tok.decode(codes))
"""

from vqtok.config import AutoencoderConfig, ConfigError, GaussianConfig, VQConfig, load_yaml
from vqtok.data import TokenDataset, encode_dataset
from vqtok.hub import load
from vqtok.models import Autoencoder, AutoencoderOutput
from vqtok.version import __version__

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "AutoencoderOutput",
    "ConfigError",
    "GaussianConfig",
    "TokenDataset",
    "VQConfig",
    "__version__",
    "encode_dataset",
    "load",
    "load_yaml",
]
