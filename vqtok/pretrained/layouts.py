"""How other libraries name the tensors of the same encoder/decoder: diffusers, LDM/taming and LlamaGen.

vqtok's `Autoencoder` holds the tensors of taming's VQGAN and LDM's first stages, layer for layer (see
`vqtok.nn.blocks`); only their names differ. A `Layout` gives, for each vqtok tensor name, the name the other
library writes, so a checkpoint is read by asking for exactly the tensors the model needs - every missing, extra or
mis-shaped one is named in the checkpoint's own terms. For the encoder's level i, residual block j:

    vqtok      encoder.levels.i.blocks.j.shortcut     .levels.i.attns.j.{norm,q,k,v,proj}   .levels.i.resample.conv
    diffusers  encoder.down_blocks.i.resnets.j.conv_shortcut  .attentions.j.{group_norm,to_q,to_k,to_v,to_out.0}
                                                                                    .down_blocks.i.downsamplers.0.conv
    LDM        encoder.down.i.block.j.nin_shortcut    .down.i.attn.j.{norm,q,k,v,proj_out}  .down.i.downsample.conv
    LlamaGen   encoder.conv_blocks.i.res.j.nin_shortcut  .conv_blocks.i.attn.j.{...,proj_out}
                                                                                    .conv_blocks.i.downsample.conv

and the mid block's (res1, attn, res2) is diffusers' mid_block.{resnets.0, attentions.0, resnets.1}, LDM's
mid.{block_1, attn_1, block_2}, LlamaGen's mid.{0, 1, 2}; `norm_out` is diffusers' `conv_norm_out`; the codebook is
`quantize.embedding.weight` in all three.

The decoder's level i (the width of channel_mult[i], i = 0 the full resolution) is taming's `decoder.up.i`, but
diffusers' `decoder.up_blocks.(n-1-i)` and LlamaGen's `decoder.conv_blocks.(n-1-i)`: both count from the lowest
resolution. diffusers stores the attention projections as Linear weights [C, C] (vqtok's 1x1 convolutions hold them as
[C, C, 1, 1]: the same numbers), and diffusers files saved before 0.14 name them query/key/value/proj_attn.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

# (pattern on a vqtok name, replacement): applied in order, each at most once per name
Rules = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Layout:
    """A naming scheme: `source_name(vqtok_name, levels)` and the checkpoint tensors that are deliberately not
    loaded (`ignored`: a prefix or exact name -> why)."""

    format: str
    rules: Rules
    reversed_decoder: bool  # whether the decoder's level index counts from the lowest resolution
    ignored: dict[str, str] = field(default_factory=dict)

    def source_name(self, name: str, levels: int) -> str:
        if self.reversed_decoder:
            name = re.sub(r"^decoder\.levels\.(\d+)\.", lambda m: f"decoder.levels.{levels - 1 - int(m[1])}.", name)
        for pattern, replacement in self.rules:
            name = re.sub(pattern, replacement, name, count=1)
        return name

    def why_ignored(self, name: str) -> str | None:
        for prefix, reason in self.ignored.items():
            if name == prefix or (prefix.endswith(".") and name.startswith(prefix)):
                return reason
        return None


_COMMON: Rules = (
    (r"\.shortcut\.", ".nin_shortcut."),
    (r"^bottleneck\.codebook$", "quantize.embedding.weight"),
)

LDM = Layout(
    format="ldm",
    rules=(
        (r"^encoder\.levels\.(\d+)\.blocks\.", r"encoder.down.\1.block."),
        (r"^decoder\.levels\.(\d+)\.blocks\.", r"decoder.up.\1.block."),
        (r"^encoder\.levels\.(\d+)\.attns\.", r"encoder.down.\1.attn."),
        (r"^decoder\.levels\.(\d+)\.attns\.", r"decoder.up.\1.attn."),
        (r"^encoder\.levels\.(\d+)\.resample\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.levels\.(\d+)\.resample\.", r"decoder.up.\1.upsample."),
        (r"\.mid\.res1\.", ".mid.block_1."),
        (r"\.mid\.attn\.", ".mid.attn_1."),
        (r"\.mid\.res2\.", ".mid.block_2."),
        (r"\.proj\.", ".proj_out."),
        *_COMMON,
    ),
    reversed_decoder=False,
    ignored={"loss.": "taming's training loss (discriminator, LPIPS), not part of the tokenizer"},
)

LLAMAGEN = Layout(
    format="llamagen",
    rules=(
        (r"^(encoder|decoder)\.levels\.(\d+)\.blocks\.", r"\1.conv_blocks.\2.res."),
        (r"^(encoder|decoder)\.levels\.(\d+)\.attns\.", r"\1.conv_blocks.\2.attn."),
        (r"^encoder\.levels\.(\d+)\.resample\.", r"encoder.conv_blocks.\1.downsample."),
        (r"^decoder\.levels\.(\d+)\.resample\.", r"decoder.conv_blocks.\1.upsample."),
        (r"\.mid\.res1\.", ".mid.0."),
        (r"\.mid\.attn\.", ".mid.1."),
        (r"\.mid\.res2\.", ".mid.2."),
        (r"\.proj\.", ".proj_out."),
        *_COMMON,
    ),
    reversed_decoder=True,
    ignored={"quantize.codebook_used": "LlamaGen's record of recently used codes (a training statistic)"},
)


def _diffusers_rules(attention: dict[str, str]) -> Rules:
    return (
        (r"^encoder\.levels\.(\d+)\.blocks\.", r"encoder.down_blocks.\1.resnets."),
        (r"^decoder\.levels\.(\d+)\.blocks\.", r"decoder.up_blocks.\1.resnets."),
        (r"^encoder\.levels\.(\d+)\.attns\.", r"encoder.down_blocks.\1.attentions."),
        (r"^decoder\.levels\.(\d+)\.attns\.", r"decoder.up_blocks.\1.attentions."),
        (r"^encoder\.levels\.(\d+)\.resample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.levels\.(\d+)\.resample\.", r"decoder.up_blocks.\1.upsamplers.0."),
        (r"\.mid\.res1\.", ".mid_block.resnets.0."),
        (r"\.mid\.attn\.", ".mid_block.attentions.0."),
        (r"\.mid\.res2\.", ".mid_block.resnets.1."),
        (r"\.attentions\.(\d+)\.norm\.", r".attentions.\1.group_norm."),
        *((rf"\.attentions\.(\d+)\.{ours}\.", rf".attentions.\1.{theirs}.") for ours, theirs in attention.items()),
        (r"\.shortcut\.", ".conv_shortcut."),
        (r"\.norm_out\.", ".conv_norm_out."),
        (r"^bottleneck\.codebook$", "quantize.embedding.weight"),
    )


DIFFUSERS = Layout(
    format="diffusers",
    rules=_diffusers_rules({"q": "to_q", "k": "to_k", "v": "to_v", "proj": "to_out.0"}),
    reversed_decoder=True,
)
# Attention names of diffusers' files before 0.14 (`AttentionBlock`), still on the Hub in older VAE repos.
DIFFUSERS_LEGACY = Layout(
    format="diffusers",
    rules=_diffusers_rules({"q": "query", "k": "key", "v": "value", "proj": "proj_attn"}),
    reversed_decoder=True,
)

LAYOUTS = {"diffusers": DIFFUSERS, "ldm": LDM, "llamagen": LLAMAGEN}


def detect_layout(names: Collection[str]) -> Layout | None:
    """The layout whose encoder names a checkpoint's tensor names use (None: none of them)."""
    if any(n.startswith("encoder.down_blocks.") or n.startswith("encoder.mid_block.") for n in names):
        legacy = any(re.search(r"\.attentions\.\d+\.(query|proj_attn)\.", n) for n in names)
        return DIFFUSERS_LEGACY if legacy else DIFFUSERS
    if any(n.startswith("encoder.conv_blocks.") for n in names):
        return LLAMAGEN
    if any(n.startswith("encoder.down.") or n.startswith("encoder.mid.block_1.") for n in names):
        return LDM
    return None


def layout_for(format: str, names: Collection[str]) -> Layout:
    """The layout of `format`, in the variant the names use (diffusers' legacy attention names)."""
    if format == "diffusers":
        detected = detect_layout(names)
        return detected if detected is not None and detected.format == "diffusers" else DIFFUSERS
    return LAYOUTS[format]


def is_1x1_of(source_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> bool:
    """A Linear weight [C_out, C_in] holding a 1x1 convolution's [C_out, C_in, 1, 1]."""
    return len(source_shape) == 2 and tuple(target_shape) == (*source_shape, 1, 1)

