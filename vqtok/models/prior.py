"""The prior: an autoregressive transformer over a tokenizer's code grid in raster order, and sampling from it.

Decoder-only and pre-norm (GPT-2): the sequence is [class token, c_0, ..., c_{T-2}] and position t predicts code c_t,
so T = h * w positions give the T codes of one image (a residual VQ's codes [h, w, R]: T = h * w * R, in raster order
with the levels fastest, so each position's coarse-to-fine codes come together and its finer levels see its coarser
ones; each token's learned absolute position tells its level, which is why rotary positions, only relative, are
refused there). The first token is the image's class (conditional priors) or the null class (unconditional
priors, and the dropped labels that make classifier-free guidance work). Attention is
`F.scaled_dot_product_attention` (flash / memory-efficient kernels where available); positions are learned absolute
embeddings or rotary (RoPE on queries and keys).

`generate` samples with a key/value cache: one token per layer per step instead of recomputing the whole prefix. The
default cache grows with the sequence (attention over the positions so far); `cache="static"` preallocates every
position and attends over all of them with the unwritten ones masked, so every decode step has the same shapes and
`compile=True` compiles it once (torch.compile; CUDA graphs on a GPU) for all positions. Sampling draws each code the
way `torch.multinomial` does (exponential noise from the same generator, argmax), without its host-side validity
check, so no path waits for the device per token and all give the same codes for the same seed.
A prior records the tokenizer whose codes it models (`config.tokenizer`: a Hub id at a commit, or a copy saved in its
`tokenizer/` sub-folder), checked by weight hash whenever the two are paired.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vqtok.config import ConfigError, PriorConfig, TokenizerRef
from vqtok.hub import HubModel, weights_sha256

if TYPE_CHECKING:
    from pathlib import Path

    from vqtok.models.autoencoder import Autoencoder

TOKENIZER_SUBFOLDER = "tokenizer"


class PriorTokenizerMismatch(ValueError):
    """A tokenizer other than the one whose codes the prior was trained on."""


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021), GPT-NeoX layout: the two halves of each head are rotated by position-dependent angles."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [max_len, head_dim]
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # derived: not saved
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D] at positions start .. start + T - 1, or at the positions in a LongTensor [T] (gathered: the
        static cache's fixed-shape steps)."""
        if torch.is_tensor(start):
            cos, sin = self.cos.index_select(0, start), self.sin.index_select(0, start)
        else:
            t = x.shape[-2]
            cos, sin = self.cos[start : start + t], self.sin[start : start + t]
        y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # angles in float32 under autocast
        y1, y2 = y.chunk(2, dim=-1)
        return (y * cos.to(y.dtype) + torch.cat([-y2, y1], dim=-1) * sin.to(y.dtype)).to(x.dtype)


class KVCache:
    """Keys and values of every layer for positions 0 .. length - 1, preallocated for the whole sequence."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, *,
                 device: torch.device, dtype: torch.dtype):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, D] at positions start .. start + T - 1; returns the keys and values up to there."""
        end = start + k.shape[-2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class StaticKVCache:
    """Keys and values of every layer for all max_len positions, written in place at the given positions; attention
    reads all max_len of them with those after each query masked. Every step of one batch has the same shapes and
    the tensors never move, so one compiled graph (one CUDA graph) serves every position. One tensor per layer (not
    one for all): a compiled step then scatters into each in place, where writing into a view of a shared tensor
    makes inductor copy the whole cache every step."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        """A cache over existing tensors, n_layer of each [B, H, max_len, D] (inside a compiled step, whose inputs
        they are); `zeros` makes a new one."""
        self.keys, self.values = keys, values

    @classmethod
    def zeros(cls, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, *,
              device: torch.device, dtype: torch.dtype) -> StaticKVCache:
        shape = (batch, n_head, max_len, head_dim)
        # zeros, not empty: masked positions get weight 0, and 0 * NaN from uninitialised memory would be NaN
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)])

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, D] at positions [T]; returns the layer's keys and values at all max_len positions."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, positions, k.to(keys.dtype))
        values.index_copy_(2, positions, v.to(values.dtype))
        return keys, values

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Which of the max_len cached positions each query at `positions` [T] may attend to: bool [T, max_len]."""
        slots = torch.arange(self.keys[0].shape[-2], device=positions.device)
        return positions[:, None] >= slots


class CausalSelfAttention(nn.Module):
    def __init__(self, config: PriorConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor, rotary: RotaryEmbedding | None,
                cache: KVCache | StaticKVCache | None) -> torch.Tensor:
        """x [B, T, C] at positions start .. start + T - 1 (an int), or at the positions [T] (a LongTensor) of a
        static cache."""
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        if rotary is not None:
            q, k = rotary(q, start), rotary(k, start)
        if isinstance(cache, StaticKVCache):
            k, v = cache.update(self.layer, start, k, v)
            mask, causal = cache.mask(start), False
        else:
            if cache is not None:
                k, v = cache.update(self.layer, start, k, v)
            t, s = q.shape[-2], k.shape[-2]
            mask, causal = None, t > 1
            if causal and s != t:  # new queries after a cached prefix: causal with the diagonal shifted by the prefix
                mask, causal = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: PriorConfig, layer: int):
        super().__init__()
        width = config.mlp_ratio * config.n_embd
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, width), nn.GELU(approximate="tanh"),
                                 nn.Linear(width, config.n_embd), nn.Dropout(config.dropout))
        self.attn_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor, rotary: RotaryEmbedding | None,
                cache: KVCache | StaticKVCache | None) -> torch.Tensor:
        x = x + self.attn_dropout(self.attn(self.ln_1(x), start, rotary, cache))
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------------------
# The prior


class TransformerPrior(HubModel, model_type="transformer_prior"):
    """p(codes | class) = prod_t p(c_t | c_<t, class) over the raster-ordered code grid of a VQ tokenizer."""

    config_class = PriorConfig
    derived_keys = ("seq_len",)

    def __init__(self, config: PriorConfig):
        super().__init__()
        if not config.resolved:
            raise ConfigError("a prior needs vocab_size, grid and num_classes (training reads them from the token "
                              f"store); got {config.vocab_size}, {config.grid}, {config.num_classes}")
        self.config = config
        c = config
        self.token_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.class_emb = nn.Embedding(c.num_classes + 1, c.n_embd)  # the last row is the null class
        self.pos_emb = nn.Parameter(torch.zeros(c.seq_len, c.n_embd)) if c.positions == "learned" else None
        self.rotary = RotaryEmbedding(c.n_embd // c.n_head, c.seq_len) if c.positions == "rotary" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.__dict__["_tokenizer"] = None  # held, not a sub-module: its weights are not the prior's
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2: N(0, 0.02) weights, zero biases, residual projections scaled by 1 / sqrt(2 * n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.config.n_layer))
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=0.02)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ------------------------------------------------------------------------------------------------------------
    # Training

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
        """Logits [B, T, vocab] of every code given the codes before it; codes [B, *grid] or [B, T], labels [B]
        (None: unconditional). In training mode labels are replaced by the null class with prob. label_dropout.
        `check=False` skips the value-range checks (a device sync each) for inputs already known to be valid."""
        codes = self._check_codes(codes, values=check)
        labels = self._check_labels(labels, len(codes), codes.device, values=check)
        if self.training and self.config.class_dropout > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.config.class_dropout
            labels = labels.masked_fill(dropped, self.null_class)
        x = torch.cat([self.class_emb(labels)[:, None], self.token_emb(codes[:, :-1])], dim=1)
        return self.head(self._trunk(x, start=0, cache=None))

    def loss(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood per code, in nats (divide by ln 2 for bits per code)."""
        return code_nll(self(codes, labels), codes)

    def _trunk(self, x: torch.Tensor, start: int | torch.Tensor, cache: KVCache | StaticKVCache | None) -> torch.Tensor:
        """Token embeddings [B, T, C] at positions start .. start + T - 1 (or at the positions [T], a LongTensor, with
        a static cache) -> final hidden states."""
        if self.pos_emb is not None:
            x = x + (self.pos_emb.index_select(0, start) if torch.is_tensor(start) else self.pos_emb[start : start + x.shape[1]])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, start, self.rotary, cache)
        return self.ln_f(x)

    def _check_codes(self, codes: torch.Tensor, values: bool = True) -> torch.Tensor:
        c = self.config
        shape = ", ".join(str(n) for n in c.grid)
        if not torch.is_tensor(codes) or codes.is_floating_point() or codes.is_complex():
            raise TypeError(f"codes must be an integer tensor [B, {shape}], got {getattr(codes, 'dtype', type(codes).__name__)}")
        if codes.ndim == 1 + len(c.grid) and tuple(codes.shape[1:]) == tuple(c.grid):
            codes = codes.flatten(1)  # raster order, a residual VQ's levels fastest
        if codes.ndim != 2 or codes.shape[1] != c.seq_len:
            raise ValueError(f"codes must have shape [B, {shape}] (or [B, {c.seq_len}]), got {tuple(codes.shape)}")
        if values and codes.numel():
            low, high = (int(v) for v in torch.aminmax(codes))  # one device sync, not two
            if low < 0 or high >= c.vocab_size:
                raise ValueError(f"codes must be in [0, {c.vocab_size}), got values in [{low}, {high}]")
        return codes.long()

    def _check_labels(self, labels: Any, n: int, device: torch.device, values: bool = True) -> torch.Tensor:
        """Labels as LongTensor [n]; None means the null class (unconditional)."""
        if labels is None:
            return torch.full((n,), self.null_class, dtype=torch.long, device=device)
        if not self.config.num_classes:
            raise ValueError("this prior is unconditional (num_classes 0): labels cannot be given")
        labels = torch.as_tensor(labels, device=device)
        if labels.ndim == 0:
            labels = labels.expand(n)
        if labels.is_floating_point() or labels.shape != (n,):
            raise ValueError(f"labels must be {n} integers (or one for all), got {labels.dtype} {tuple(labels.shape)}")
        if values and n:
            low, high = (int(v) for v in torch.aminmax(labels))
            if low < 0 or high >= self.config.num_classes:
                raise ValueError(f"labels must be in [0, {self.config.num_classes}), got values in [{low}, {high}]")
        return labels.long()

    # ------------------------------------------------------------------------------------------------------------
    # Sampling

    @torch.no_grad()  # not inference_mode: the codes it returns may go into a forward pass with gradients
    def generate(
        self,
        n: int,
        labels: int | Sequence[int] | torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 1.0,
        seed: int | None = None,
        batch_size: int | None = None,
        prefix: torch.Tensor | None = None,
        use_cache: bool = True,
        cache: str | None = None,
        compile: bool = False,  # noqa: A002 - the name torch and transformers use
    ) -> torch.Tensor:
        """Sample n code grids LongTensor [n, h, w] ([n, h, w, R] for a residual VQ's grid), batched, with a KV cache.

        labels: one class for all, one per sample, or None (unconditional; the null class of a conditional prior).
        temperature 0 is greedy decoding; top_k / top_p (nucleus) restrict each step's distribution. cfg_scale != 1
        is classifier-free guidance, logits_uncond + cfg_scale * (logits_cond - logits_uncond), which needs labels;
        the conditional and unconditional rows run in the same batch.
        `prefix` [n, k] (raster order) fixes the first k codes and samples the rest: image completion.
        `seed` makes the samples reproducible (a generator of their own; None: the global RNG) for the same n and
        batch_size: chunks of `batch_size` draw from that generator in turn. `use_cache=False` recomputes the whole
        prefix at every step (the reference the caches are tested against).

        `cache`: "dynamic" (the default without compile) grows with the sequence; "static" preallocates all
        positions and attends over all of them, the later ones masked, so that every decode step has one shape.
        `compile=True` (implies cache="static") compiles that step once with torch.compile - mode "reduce-overhead"
        (CUDA graphs) on a GPU, inductor on a CPU - like transformers' cache_implementation="static" with a compiled
        forward. The first call compiles (seconds to minutes); the compiled step and its cache (2 x n_layer x rows x
        seq_len x n_embd, rows = batch_size, twice that with guidance) stay on the prior for later calls of the same
        batch size and dtype, until `release_generation_cache()`; a last, smaller chunk is padded to batch_size rows.
        Every path gives the same codes for the same seed up to the last bits of the logits (the static cache's
        masked attention sums in another order; float64 priors agree exactly in the tests).
        """
        chunks = self.generate_batches(n, labels, temperature=temperature, top_k=top_k, top_p=top_p,
                                       cfg_scale=cfg_scale, seed=seed, batch_size=batch_size, prefix=prefix,
                                       use_cache=use_cache, cache=cache, compile=compile)
        return torch.cat(list(chunks)).view(n, *self.config.grid)

    def generate_batches(
        self,
        n: int,
        labels: int | Sequence[int] | torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 1.0,
        seed: int | None = None,
        batch_size: int | None = None,
        prefix: torch.Tensor | None = None,
        use_cache: bool = True,
        cache: str | None = None,
        compile: bool = False,  # noqa: A002
    ) -> Iterator[torch.Tensor]:
        """The codes of `generate` with the same arguments, as they are sampled: chunks [b, h, w] of `batch_size`
        (None: all n at once), so that many samples can be decoded and written without holding them all. Nothing of
        size n is allocated unless labels or a prefix are given per sample. The arguments are checked at once (the
        only host-device syncs: none happens per code); the prior is in eval mode while chunks are drawn (its mode
        comes back when the iterator is exhausted or closed)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_sampling(temperature, top_k, top_p)
        mode = _decoding_mode(use_cache, cache, compile)
        device = self.head.weight.device
        if cfg_scale != 1.0 and (labels is None or not self.config.num_classes):
            raise ValueError("cfg_scale != 1 (classifier-free guidance) needs a class-conditional prior and labels")
        one_label = labels is None or torch.as_tensor(labels).ndim == 0
        labels = self._check_labels(labels, 1 if one_label else n, device)
        prefix = self._check_prefix(prefix, n, device)
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        settings = (temperature, top_k, top_p, cfg_scale, generator, mode)
        return self._sample_batches(n, batch_size or n, labels if not one_label else None, labels[0], prefix, settings)

    @torch.no_grad()
    def _sample_batches(self, n: int, batch_size: int, labels: torch.Tensor | None, label: torch.Tensor,
                        prefix: torch.Tensor, settings: tuple) -> Iterator[torch.Tensor]:
        """Chunks of samples in turn: `labels` [n] per sample, or None for `label` for all. The compiled path runs
        every chunk on batch_size rows (one shape, one graph)."""
        was_training = self.training
        self.eval()
        rows = min(batch_size, n) if settings[-1] == "compiled" else None
        try:
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                chunk = labels[start : start + b] if labels is not None else label.repeat(b)
                codes = self._sample(chunk, prefix[start : start + b], *settings, rows=rows)
                yield codes.view(b, *self.config.grid)
        finally:
            self.train(was_training)

    def _sample(self, labels: torch.Tensor, known: torch.Tensor, temperature: float, top_k: int | None,
                top_p: float | None, cfg_scale: float, generator: torch.Generator | None, mode: str | bool,
                rows: int | None = None) -> torch.Tensor:
        """Codes after the `known` ones [b, k], one position at a time. mode "recompute" runs the whole sequence at
        every step; the cached modes ("dynamic", "static", "compiled") run the class token and prefix at once, then
        each new code once. `rows` pads the batch to that many samples (the compiled step's one shape); only the b
        real rows are sampled, so the generator's stream is that of the unpadded batch. Nothing here reads a device
        value on the host. (A bool mode is the former `use_cache`: True "dynamic", False "recompute".)"""
        mode = {True: "dynamic", False: "recompute"}.get(mode, mode) if isinstance(mode, bool) else mode
        b, t_total, k = len(labels), self.config.seq_len, known.shape[1]
        pad = (rows or b) - b
        if pad:
            labels = torch.cat([labels, labels.new_full((pad,), self.null_class)])
            known = torch.cat([known, known.new_zeros(pad, k)])
        guided = cfg_scale != 1.0
        rows_in = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        copies = len(rows_in) // len(labels)  # the guided batch holds each sample twice (conditional, unconditional)
        codes = torch.zeros(len(labels), t_total, dtype=torch.long, device=labels.device)
        codes[:, :k] = known
        first = self.class_emb(rows_in)[:, None]  # [rows, 1, C]
        prefill = torch.cat([first, self.token_emb(known.repeat(copies, 1))], 1)  # class token and prefix
        cache = (None if mode == "recompute" else self._new_cache(len(rows_in), first.dtype) if mode == "dynamic" else
                 self._static_cache(len(rows_in), first.dtype, keep=mode == "compiled"))
        step = self._compiled_decode_step() if mode == "compiled" else self._decode_step
        positions = torch.arange(t_total, device=labels.device)
        for t in range(k, t_total):
            if mode == "recompute":
                x = torch.cat([first, self.token_emb(codes[:, :t].repeat(copies, 1))], 1)
                logits = self._logits(self._trunk(x, start=0, cache=None)[:, -1])
            elif t == k:  # the prefill: eager, once per chunk
                logits = self._logits(self._trunk(prefill, positions[: k + 1] if mode != "dynamic" else 0, cache)[:, -1])
            elif mode == "dynamic":
                logits = self._logits(self._trunk(self.token_emb(codes[:, t - 1].repeat(copies))[:, None], t, cache)[:, -1])
            else:
                if labels.is_cuda:
                    _cudagraph_step_begin()
                logits = step(codes[:, t - 1].repeat(copies), positions[t : t + 1], cache.keys, cache.values)
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            codes[:b, t] = sample_from_logits(logits[:b], temperature, top_k, top_p, generator)
        return codes[:b]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-code logits [B, vocab] from final hidden states [B, C]: float32 (float64 in a float64 prior)."""
        logits = self.head(hidden)
        return logits if logits.dtype == torch.float64 else logits.float()

    def _decode_step(self, tokens: torch.Tensor, position: torch.Tensor, keys: list[torch.Tensor],
                     values: list[torch.Tensor]) -> torch.Tensor:
        """One fixed-shape decode step: the codes [B] at `position` [1] (a LongTensor, so one graph serves every
        position) are written into the static cache (keys, values: n_layer tensors [B, H, seq_len, D], in place) and
        give the next position's logits [B, vocab]."""
        hidden = self._trunk(self.token_emb(tokens)[:, None], position, StaticKVCache(keys, values))
        return self._logits(hidden[:, -1])

    def _compiled_decode_step(self) -> Any:
        """`_decode_step` compiled once per prior (kept with it, not a sub-module: the state dict is unchanged).
        CUDA: mode "reduce-overhead", whose CUDA graphs replay the step's kernels with one launch; the static cache's
        tensors are marked static inputs so that the graph writes them in place. Elsewhere: inductor's default."""
        compiled = self.__dict__.get("_compiled_decode")
        if compiled is None:
            mode = "reduce-overhead" if self.head.weight.device.type == "cuda" else None
            compiled = torch.compile(self._decode_step, mode=mode, dynamic=False, fullgraph=True)
            self.__dict__["_compiled_decode"] = compiled
        return compiled

    def _static_cache(self, rows: int, dtype: torch.dtype, keep: bool) -> StaticKVCache:
        """A static cache for `rows` rows: new, or with `keep` the one kept on the prior while rows, dtype and device
        match (a compiled graph's cache must not move: a new one would be a new CUDA graph)."""
        if not keep:
            return self._new_cache(rows, dtype, static=True)
        device = self.head.weight.device
        key = (rows, dtype, device)
        held = self.__dict__.get("_kept_kv_cache")
        if held is None or held[0] != key:
            self.__dict__["_kept_kv_cache"] = None  # free the old one before allocating
            cache = self._new_cache(rows, dtype, static=True)
            mark_static = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
            if mark_static is not None and device.type == "cuda":
                for tensor in (*cache.keys, *cache.values):
                    mark_static(tensor)
            self.__dict__["_kept_kv_cache"] = held = (key, cache)
        return held[1]

    def release_generation_cache(self) -> None:
        """Free what `generate(compile=True)` keeps between calls: the static KV cache and the compiled step."""
        self.__dict__["_kept_kv_cache"] = None
        self.__dict__["_compiled_decode"] = None

    def _check_prefix(self, prefix: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        """Known first codes as LongTensor [n, k] (k = 0 without a prefix)."""
        if prefix is None:
            return torch.empty(n, 0, dtype=torch.long, device=device)
        t = self.config.seq_len
        if not torch.is_tensor(prefix) or prefix.ndim != 2 or prefix.shape[0] != n or prefix.shape[1] > t:
            raise ValueError(f"prefix must be a tensor [n={n}, k] of the first k <= {t} codes in raster order, got "
                             f"{tuple(prefix.shape) if torch.is_tensor(prefix) else type(prefix).__name__}")
        if prefix.is_floating_point() or (prefix.numel() and not 0 <= int(prefix.min()) <= int(prefix.max()) < self.config.vocab_size):
            raise ValueError(f"prefix must hold integer codes in [0, {self.config.vocab_size})")
        return prefix.to(device=device, dtype=torch.long)

    def _new_cache(self, batch: int, dtype: torch.dtype, static: bool = False) -> KVCache | StaticKVCache:
        c = self.config
        kind = StaticKVCache.zeros if static else KVCache
        return kind(c.n_layer, batch, c.n_head, c.seq_len, c.n_embd // c.n_head, device=self.head.weight.device,
                    dtype=dtype)

    # ------------------------------------------------------------------------------------------------------------
    # The tokenizer it belongs to

    @property
    def tokenizer(self) -> Autoencoder:
        """The tokenizer whose codes this prior models (loaded on first use from its recorded place, hash-checked)."""
        if self._tokenizer is None:
            self.attach_tokenizer(self.load_tokenizer())
        return self._tokenizer

    def attach_tokenizer(self, tokenizer: Autoencoder) -> None:
        """Pair the prior with its tokenizer in memory (checked: see `check_tokenizer`)."""
        self.check_tokenizer(tokenizer)
        self.__dict__["_tokenizer"] = tokenizer

    def check_tokenizer(self, tokenizer: Autoencoder) -> None:
        """Refuse a tokenizer other than the recorded one (weight hash) or one with another vocabulary."""
        ref = self.config.tokenizer
        if ref is None:
            raise PriorTokenizerMismatch("this prior records no tokenizer (config.tokenizer is None)")
        if getattr(tokenizer, "vocab_size", None) != self.config.vocab_size:
            raise PriorTokenizerMismatch(
                f"the prior models {self.config.vocab_size} codes; this tokenizer has "
                f"{getattr(tokenizer, 'vocab_size', None)}")
        actual = weights_sha256(tokenizer)
        if actual != ref.weights_sha256:
            raise PriorTokenizerMismatch(
                f"this prior was trained on the codes of the tokenizer with weights {ref.weights_sha256[:12]}... "
                f"({ref.repo_id or 'its tokenizer/ copy'}); the given tokenizer's weights are {actual[:12]}...")

    def load_tokenizer(self) -> Autoencoder:
        """Load the recorded tokenizer: from the Hub at the recorded revision, or from the prior's own tokenizer/
        sub-folder; its weights are checked against the recorded hash."""
        from vqtok.hub import load
        from vqtok.models.autoencoder import Autoencoder

        ref = self.config.tokenizer
        if ref is None:
            raise PriorTokenizerMismatch("this prior records no tokenizer (config.tokenizer is None)")
        device = self.head.weight.device
        if ref.repo_id is not None:
            tokenizer = load(ref.repo_id, revision=ref.revision, map_location=device)
        elif self.loaded_from is not None:
            origin = self.loaded_from
            sub = "/".join(p for p in (origin.subfolder, TOKENIZER_SUBFOLDER) if p)
            tokenizer = Autoencoder.from_pretrained(origin.source, revision=origin.commit, subfolder=sub,
                                                    map_location=device)
        else:
            raise PriorTokenizerMismatch("this prior keeps its tokenizer in its folder's tokenizer/, but it was not "
                                         "loaded from a folder; attach_tokenizer() it")
        self.check_tokenizer(tokenizer)
        return tokenizer

    def _save_pretrained(self, save_directory: Path) -> None:
        """config.json + model.safetensors, and the tokenizer's copy in tokenizer/ when it is not on the Hub."""
        ref = self.config.tokenizer
        if ref is not None and ref.repo_id is None:
            self.tokenizer.save_pretrained(save_directory / TOKENIZER_SUBFOLDER)
        elif (save_directory / TOKENIZER_SUBFOLDER).exists():
            raise FileExistsError(f"{save_directory / TOKENIZER_SUBFOLDER} exists but this prior's tokenizer is "
                                  f"{'on the Hub' if ref else 'not recorded'}; remove it, or save elsewhere")
        super()._save_pretrained(save_directory)

    card_task = ("unconditional-image-generation", "Code modelling")

    def card_defaults(self, load: str) -> dict[str, Any]:
        """The prior's model card (see HubModel.generate_model_card): how to sample it and decode the samples."""
        c = self.config
        sample = (f"prior.generate(16, labels=3, cfg_scale=2.0, seed=0)  # class 3 of {c.num_classes}"
                  if c.num_classes else "prior.generate(16, seed=0)")
        card = {
            "description": "transformer prior over image-tokenizer codes",
            "intro": f"An autoregressive transformer prior over the {'x'.join(str(n) for n in c.grid)} code grids of "
                     f"an image tokenizer (a vocabulary of {c.vocab_size:,}"
                     f"{f', {c.num_classes} classes' if c.num_classes else ', unconditional'}), made with "
                     "[vqtok](https://github.com/vqtok/vqtok).",
            "tags": ["autoregressive-prior"],
            "pipeline_tag": "unconditional-image-generation",
            "usage": (f"import vqtok\n\nprior = {load}\ncodes = {sample}  # LongTensor [16, h, w"
                      f"{', R' if len(c.grid) == 3 else ''}]\ntokenizer = "
                      "prior.load_tokenizer()  # the recorded tokenizer, checked by its weights' hash\nimages = "
                      "tokenizer.postprocess(tokenizer.decode(codes), output_type=\"pil\")"),
            "intended_use": "Sampling new images code by code (of a chosen class when it is class-conditional, with "
                            "classifier-free guidance), completing images from their first codes (`prefix=`), and "
                            "measuring the bits per code of held-out images; research on generative models of "
                            "images.",
            "limitations": "It models the codes of one tokenizer, recorded by its weights' hash, and means nothing "
                           "with another. Its samples are no better than that tokenizer's reconstructions and "
                           "reflect its training data, biases and gaps included, and may reproduce training images. "
                           "The measured numbers hold for the held-out codes they were measured on. It has not been "
                           "evaluated for generating images of people.",
        }
        ref = c.tokenizer
        if ref is not None and ref.repo_id is None:
            card["files"] = {f"{TOKENIZER_SUBFOLDER}/": "the tokenizer whose codes it models "
                                                        "(`prior.load_tokenizer()`)"}
        return card

    def card_submodels(self) -> dict[str, HubModel]:
        """The tokenizer, when it is saved in the prior's tokenizer/ (not on the Hub)."""
        ref = self.config.tokenizer
        return {TOKENIZER_SUBFOLDER: self.tokenizer} if ref is not None and ref.repo_id is None else {}

    def card_facts(self) -> dict[str, Any]:
        """The card's facts, with the tokenizer it models."""
        ref = self.config.tokenizer
        where = None if ref is None else (f"{ref.repo_id} at {ref.revision}" if ref.repo_id else
                                          f"`{TOKENIZER_SUBFOLDER}/` in this repo")
        return {**super().card_facts(), **({"tokenizer": where} if where else {})}

    def derived_config(self) -> dict[str, Any]:
        return {"seq_len": self.config.seq_len}


def decode_labels(prior: TransformerPrior, tokenizer: Autoencoder,
                  labels: int | Sequence[int] | torch.Tensor | None) -> dict[str, Any]:
    """The keywords with which `tokenizer` decodes codes that `prior` sampled with `labels`: none for an unconditional
    tokenizer; for a class-conditional one, those labels when the prior is class-conditional with as many classes
    (a prior trained on the tokenizer's store, whose labels the codes were encoded with), else labels None - the
    tokenizer's null label, its unconditional pass."""
    classes = getattr(tokenizer.config, "num_classes", 0)
    if not classes:
        return {}
    return {"labels": labels if prior.config.num_classes == classes else None}


def tokenizer_ref(tokenizer: Autoencoder) -> TokenizerRef:
    """How a prior records `tokenizer`: its Hub repo at the loaded commit, or (a local or in-memory tokenizer) a copy
    kept in the prior's tokenizer/ sub-folder."""
    origin = tokenizer.loaded_from
    if origin is not None and origin.is_hub and origin.subfolder is None:
        return TokenizerRef(repo_id=origin.source, revision=origin.commit, weights_sha256=weights_sha256(tokenizer))
    return TokenizerRef(weights_sha256=weights_sha256(tokenizer))


def code_nll(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood in nats of codes [B, *grid] (or [B, T]) under logits [B, T, vocab], in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), codes.reshape(-1))


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of logits [B, V]: greedy at temperature 0, else from softmax(logits / temperature)
    restricted to the top_k most likely and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, -math.inf)
    return _multinomial_one(logits.softmax(dim=-1), generator)


def _multinomial_one(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`torch.multinomial(probs, 1, generator=generator).squeeze(-1)`, the same draws from the same generator (its
    own algorithm for one sample: argmax of probs / Exp(1) noise), without its validity check, which reads the
    probabilities on the host (a device sync per call); here they come from a softmax, valid by construction."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def _decoding_mode(use_cache: bool, cache: str | None, compile: bool) -> str:  # noqa: A002
    """generate's use_cache / cache / compile as one of "recompute", "dynamic", "static", "compiled"; flags that
    contradict each other are refused, not ignored."""
    if cache not in (None, "dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
    if not use_cache:
        if cache is not None or compile:
            raise ValueError("use_cache=False recomputes every step without a cache; cache= and compile=True need one")
        return "recompute"
    if compile:
        if cache == "dynamic":
            raise ValueError("compile=True needs cache='static' (fixed shapes for every step), not 'dynamic'")
        return "compiled"
    return cache or "dynamic"


def _cudagraph_step_begin() -> None:
    """Tell CUDA graph trees that a new decode step begins (its previous outputs are no longer read); torch >= 2.2."""
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
