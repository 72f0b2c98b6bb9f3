"""Tokenizers people already use, in vqtok: diffusers' AutoencoderKL and VQModel (folders and Hub repos, loaded by
`vqtok.load` directly), and LDM/taming and LlamaGen checkpoints (converted with `convert` or `vqtok convert`)."""

from vqtok.pretrained.checkpoint import read_checkpoint
from vqtok.pretrained.convert import FORMATS, convert, foreign_format, plan

__all__ = ["FORMATS", "convert", "foreign_format", "plan", "read_checkpoint"]
