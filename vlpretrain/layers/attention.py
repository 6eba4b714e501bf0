"""Attention: who attends to whom (layouts) and the one switch that picks the kernel (backends).

A sequence is ``[image tokens (n_image) ; text tokens (n_text)]``. A layout says which query may
attend to which key; it is data built once per batch, not a different network:

=============  =============================================================================
``image``      image tokens only, bidirectional
``text``       text tokens only, causal (or bidirectional for masked token modelling)
``prefix_lm``  image bidirectional; text causal and attends to the image; image never sees text
``fused``      everything attends to everything (bidirectional)
``separate``   image and text in one sequence, no attention across the two
=============  =============================================================================

Text padding is part of the layout (no real token attends to a pad key; a pad query attends to
itself so its row stays finite). ``text_causal`` may also be a (B,) bool tensor: causal text in those
rows, bidirectional in the others (CapPa's mix of autoregressive and parallel captions in one pass).
``cross_from_layer = K`` makes ``prefix_lm``/``fused`` act as ``separate`` in blocks ``< K``: text
reads the image only from block K on (CoCa in one pass).

The mask rule is written once (:meth:`AttentionLayout.allowed`) with broadcasting tensor ops; the
dense masks of ``eager``/``sdpa`` and the block masks of ``flex`` are both evaluated from it.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYOUTS = ("image", "text", "prefix_lm", "fused", "separate")
BACKENDS = ("sdpa", "flex", "flash_attn", "eager", "sdpa_aligned")
KEY_ALIGN = 8  # sdpa_aligned: masked attention runs on keys padded to a multiple of this
ENV_VAR = "VLPRETRAIN_ATTN"


def resolve_backend(configured: str | None = None) -> str:
    """The attention backend: the config's value, else ``$VLPRETRAIN_ATTN``, else ``sdpa``."""
    name = configured or os.environ.get(ENV_VAR) or "sdpa"
    if name not in BACKENDS:
        origin = "config attn_backend" if configured else f"${ENV_VAR}"
        raise ValueError(f"unknown attention backend '{name}' (from {origin}); valid: {', '.join(BACKENDS)}.")
    return name


_warned: set[tuple[str, str]] = set()


def _fallback(backend: str, reason: str) -> str:
    """Warn once per (backend, reason) that ``sdpa`` serves instead, and return ``sdpa``."""
    if (backend, reason) not in _warned:
        _warned.add((backend, reason))
        warnings.warn(f"attention backend '{backend}' cannot serve this call ({reason}); using 'sdpa'.",
                      stacklevel=3)
    return "sdpa"


def _unit_head_dim(mask: torch.Tensor) -> torch.Tensor:
    """(N, Lq, Lkv) -> (N, 1, Lq, Lkv), the head dim's stride 1: the layout inductor gives a mask it saves
    for the backward. With the stride unsqueeze gives (Lq * Lkv), the layouts differ (in a size-1 dim only)
    and AOTAutograd pins the backward's copy to the first batch's concrete strides, so a compiled backward
    failed at the next caption length (torch 2.14). The stride of a size-1 dim changes no value."""
    mask = mask.contiguous()
    n, lq, lkv = mask.shape
    return mask.as_strided((n, 1, lq, lkv), (lq * lkv, 1, lkv, 1))


@dataclass(eq=False)
class AttentionLayout:
    """Who attends to whom in one batch; see the module docstring for the kinds."""

    kind: str
    n_image: int
    n_text: int
    text_causal: bool | torch.Tensor = True  # or (B,) bool: per sequence (its values never read on the host)
    # (B, n_text) bool, False at padding; None: nothing padded. Its values are never read on the host (on an
    # accelerator that waits for the device), so an all-True mask still builds per-row masks
    text_valid: torch.Tensor | None = None
    cross_from_layer: int = 0
    _masks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"unknown attention layout '{self.kind}'; valid: {', '.join(LAYOUTS)}.")
        if self.kind == "image" and self.n_text:
            raise ValueError("layout 'image' takes no text tokens; use 'prefix_lm', 'fused' or 'separate'.")
        if self.kind == "text" and self.n_image:
            raise ValueError("layout 'text' takes no image tokens; use 'prefix_lm', 'fused' or 'separate'.")
        if self.text_valid is not None:
            self.text_valid = self.text_valid.bool()
            if self.text_valid.dim() != 2 or self.text_valid.shape[1] != self.n_text:
                raise ValueError(f"text_valid must have shape (B, {self.n_text}), got {tuple(self.text_valid.shape)}.")
        if isinstance(self.text_causal, torch.Tensor):
            self.text_causal = self.text_causal.bool()
            if self.text_causal.dim() != 1:
                raise ValueError(f"a per-sequence text_causal must have shape (B,), "
                                 f"got {tuple(self.text_causal.shape)}.")

    @property
    def per_row(self) -> bool:
        """Whether masks differ between the sequences of the batch (padding, or per-sequence causality)."""
        return self.text_valid is not None or isinstance(self.text_causal, torch.Tensor)

    @property
    def batch_size(self) -> int | None:
        rows = self.text_valid if self.text_valid is not None else self.text_causal
        return rows.shape[0] if isinstance(rows, torch.Tensor) else None

    @property
    def length(self) -> int:
        return self.n_image + self.n_text

    def crosses(self, layer: int) -> bool:
        """Whether text and image may attend across in block ``layer``."""
        return self.kind in ("prefix_lm", "fused") and layer >= self.cross_from_layer

    def _key_valid(self) -> torch.Tensor | None:
        if self.text_valid is None:
            return None
        ones = self.text_valid.new_ones(self.text_valid.shape[0], self.n_image)
        return torch.cat([ones, self.text_valid], dim=1)  # (B, L)

    def allowed(self, b, q, kv, cross: bool, key_valid=None):
        """True where query position ``q`` may attend to key position ``kv`` (broadcasting)."""
        q_img, kv_img = q < self.n_image, kv < self.n_image
        both_txt = ~q_img & ~kv_img
        if isinstance(self.text_causal, torch.Tensor):  # causal in some sequences, bidirectional in the others
            text_ok = both_txt & ((kv <= q) | ~self.text_causal[b])
        else:
            text_ok = (both_txt & (kv <= q)) if self.text_causal else both_txt
        ok = (q_img & kv_img) | text_ok
        if cross:
            ok = ok | (~q_img & kv_img)
            if self.kind == "fused":
                ok = ok | (q_img & ~kv_img)
        if key_valid is not None:
            ok = ok & key_valid[b, kv]
        return ok | (q == kv)

    def _needs_mask(self, cross: bool) -> bool:
        if self.per_row:
            return True
        if self.kind == "image" or (self.kind == "fused" and cross):
            return False
        return True

    def dense_mask(self, layer: int, q_offset: int, n_query: int, device) -> torch.Tensor | None:
        """Boolean mask (B or 1, 1, Lq, Lkv) for ``eager``/``sdpa``; None when all may attend."""
        cross = self.crosses(layer)
        if not self._needs_mask(cross):
            return None

        def build():
            q = torch.arange(q_offset, q_offset + n_query, device=device)
            return self._rows_mask(q[None, :, None], cross, device)

        return self._cached(("dense", cross, q_offset, n_query, str(device)), build)

    def query_mask(self, layer: int, query_index: torch.Tensor, device) -> torch.Tensor | None:
        """Boolean mask (B, 1, 1, Lkv) of one query per sequence at positions ``query_index`` (B,); None when
        all may attend. The rows of :meth:`dense_mask` at those positions, built without the whole mask."""
        cross = self.crosses(layer)
        if not self._needs_mask(cross):
            return None
        return self._rows_mask(query_index[:, None, None], cross, device)

    def _rows_mask(self, q: torch.Tensor, cross: bool, device) -> torch.Tensor:
        """:meth:`allowed` of query positions ``q`` ((1 or B, Lq, 1)) against every key: (B or 1, 1, Lq, Lkv)."""
        kv = torch.arange(self.length, device=device)
        key_valid = self._key_valid()
        b = torch.arange(self.batch_size, device=device)[:, None, None] if self.per_row else 0
        mask = self.allowed(b, q, kv[None, None, :], cross, key_valid.to(device) if key_valid is not None else None)
        return _unit_head_dim(mask)

    def _cached(self, key: tuple, build):
        """``build()`` once per ``key`` for this layout (one batch). Inside torch.compile the key's sizes are
        symbolic, and a dict lookup would pin them to this batch's values (one graph per text length, up to
        dynamo's limit, then eager): built at each use there, where the graph's common subexpressions merge."""
        if torch.compiler.is_compiling():
            return build()
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def is_plain_causal(self, q_offset: int, n_query: int) -> bool:
        """Pure causal text with no padding: SDPA's ``is_causal`` fast path applies."""
        return (self.kind == "text" and self.text_causal is True and not self.per_row
                and q_offset == 0 and n_query == self.length)

    def block_mask(self, layer: int, q_offset: int, n_query: int, device):
        """FlexAttention ``BlockMask`` evaluated from :meth:`allowed`."""
        from torch.nn.attention.flex_attention import create_block_mask

        cross = self.crosses(layer)

        def build():
            key_valid = self._key_valid()
            key_valid = key_valid.to(device) if key_valid is not None else None

            def mask_mod(b, h, q, kv):
                return self.allowed(b, q + q_offset, kv, cross, key_valid)

            return create_block_mask(mask_mod, self.batch_size, None, n_query, self.length, device=device)

        return self._cached(("flex", cross, q_offset, n_query, str(device)), build)

    def flash_segments(self, layer: int) -> bool | None:
        """The single causal flag flash-attn varlen can serve this block with, or None if it can't."""
        cross = self.crosses(layer)
        if self.kind == "image":
            return False
        if self.kind == "text":
            return self.text_causal if isinstance(self.text_causal, bool) else None
        if self.kind == "fused" and cross:
            return False
        return None


class KVCache:
    """Keys and values of earlier positions per block, for incremental decoding."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # the layout the cache was filled under, continued by later steps
        self.n_image, self.n_text, self.kind, self.cross_from_layer = 0, 0, "text", 0

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer in self.layers:
            pk, pv = self.layers[layer]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


def _eager(q, k, v, mask):
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Lq, Lkv)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


_compiled_flex = None


def _flex(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if q.device.type != "cuda":  # uncompiled (reference-speed) path off the GPU
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:  # automatic dynamic shapes: a static kernel for the first length, then one
        _compiled_flex = torch.compile(flex_attention)  # dynamic kernel for all others (dynamic=False
        # recompiled per length, hit dynamo's recompile limit and then ran flex unfused)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _flash(q, k, v, layout: AttentionLayout, causal: bool):
    try:  # an optional package: the try also keeps transformers' remote-code import check quiet
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as exc:
        raise RuntimeError("the flash_attn backend needs `pip install vlpretrain[flash]` on a CUDA machine.") from exc

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, Dh)
    key_valid = layout._key_valid()
    if key_valid is None:
        return flash_attn_func(q, k, v, causal=causal).transpose(1, 2)
    valid = key_valid.to(q.device)
    lengths = valid.sum(1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    packed = flash_attn_varlen_func(q[valid], k[valid], v[valid], cu, cu, longest, longest, causal=causal)
    out = q.new_zeros(q.shape)
    out[valid] = packed
    return out.transpose(1, 2)


def attend(q, k, v, layout: AttentionLayout, layer: int, backend: str, q_offset: int = 0,
           query_index: torch.Tensor | None = None):
    """Attention of ``q`` (B, H, Lq, Dh) over ``k, v`` (B, H, Lkv, Dh) under ``layout``: the one switch.

    query_index: (B,) the one position each row's single query (Lq = 1) sits at, for a block that
    computes only pooled tokens; it runs on the dense-mask row of that position (eager or SDPA)."""
    if query_index is not None:
        mask = layout.query_mask(layer, query_index, q.device)  # (B, 1, 1, L) or None
        return _eager(q, k, v, mask) if backend == "eager" else F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    n_query = q.shape[2]
    if backend == "flash_attn":
        causal = layout.flash_segments(layer)
        if not flash_attn_available():
            backend = _fallback(backend, "flash-attn is not installed or no CUDA device")
        elif q.dtype not in (torch.float16, torch.bfloat16):
            backend = _fallback(backend, f"flash-attn needs fp16/bf16, got {q.dtype}")
        elif causal is None or q_offset or n_query != layout.length:
            backend = _fallback(backend, f"layout '{layout.kind}' at block {layer} or a KV-cache step")
        else:
            return _flash(q, k, v, layout, causal)
    if backend == "flex" and q.device.type == "cpu" and torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad):
        backend = _fallback(backend, "FlexAttention has no backward on the CPU")
    if backend == "flex":
        return _flex(q, k, v, layout.block_mask(layer, q_offset, n_query, q.device))
    if backend in ("sdpa", "sdpa_aligned") and layout.is_plain_causal(q_offset, n_query):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = layout.dense_mask(layer, q_offset, n_query, q.device)
    if backend == "eager":
        return _eager(q, k, v, mask)
    if backend == "sdpa_aligned" and mask is not None:
        return sdpa_keys_padded(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_keys_padded(q, k, v, mask: torch.Tensor, multiple: int = KEY_ALIGN):
    """Masked SDPA with keys and values padded by zeros, masked out, to a multiple of ``multiple``: the same
    attention (a masked key gets no weight) on an aligned key length. The ``sdpa_aligned`` backend (off unless
    selected): on the H200 cuDNN's masked forward took 564 us at 261 tokens and 288 us at 264 (issue 22);
    tools/gpu_check.py's attention_alignment section times it against an 8-aligned bias before a default."""
    extra = -k.shape[2] % multiple
    if extra == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    k, v = (F.pad(t, (0, 0, 0, extra)) for t in (k, v))  # (B, H, L + extra, Dh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=F.pad(mask, (0, extra), value=False))


class Attention(nn.Module):
    """Multi-head self-attention with timm ViT parameter names (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not a multiple of num_heads {num_heads}.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, layout: AttentionLayout, layer: int, backend: str, cache: KVCache | None = None,
                query_index: torch.Tensor | None = None):
        """x (B, L, D) -> (B, L, D); with ``query_index`` (B,) only that position's output, (B, 1, D)."""
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        q_offset = 0
        if cache is not None:
            q_offset = cache.layers[layer][0].shape[2] if layer in cache.layers else 0
            k, v = cache.update(layer, k, v)
        if query_index is not None:
            q = q[torch.arange(B, device=x.device), :, query_index].unsqueeze(2)  # (B, H, 1, Dh)
        out = attend(q, k, v, layout, layer, backend, q_offset, query_index)  # (B, H, Lq, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, q.shape[2], D))
