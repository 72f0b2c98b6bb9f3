"""Building blocks: residual blocks, attention, resampling, and the encoder/decoder made of them."""

from vqtok.nn.blocks import AttnBlock, Downsample, ResBlock, Upsample
from vqtok.nn.decoder import Decoder
from vqtok.nn.encoder import Encoder

__all__ = ["AttnBlock", "Decoder", "Downsample", "Encoder", "ResBlock", "Upsample"]
