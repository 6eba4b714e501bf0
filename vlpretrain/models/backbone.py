"""The shared trunk: one pre-norm transformer reads image patches and text tokens.

Parameter names follow timm's VisionTransformer (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so a timm ViT checkpoint
loads key-by-key into the image path. Text adds ``text_embed``, ``text_pos_embed``; modality
experts add ``blocks.N.{text_norm1,text_norm2,text_mlp}`` and ``text_norm`` beside the image ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vlpretrain.layers.draws import rand as draw_uniform
from vlpretrain.layers.attention import BACKENDS, Attention, AttentionLayout, KVCache, resolve_backend
from vlpretrain.layers.mlp import Mlp
from vlpretrain.models.config import ModelConfig
from vlpretrain.models.heads import IMAGE_POOL_INDEX, text_pool_index


class Block(nn.Module):
    """Pre-norm block; with experts, image and text tokens use their own norms and MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn = Attention(D, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mlp = Mlp(D, hidden)
        self.experts = cfg.modality_experts
        if self.experts:
            self.text_norm1 = nn.LayerNorm(D, eps=cfg.norm_eps)
            self.text_norm2 = nn.LayerNorm(D, eps=cfg.norm_eps)
            self.text_mlp = Mlp(D, hidden)
        # CLIP's initialisation std of each weight (VLModel._init_weights applies it)
        residual_std = D ** -0.5 * (2 * cfg.depth) ** -0.5
        self.attn.qkv.init_std, self.attn.proj.init_std = D ** -0.5, residual_std
        for mlp in (self.mlp, self.text_mlp) if self.experts else (self.mlp,):
            mlp.fc1.init_std, mlp.fc2.init_std = (2 * D) ** -0.5, residual_std

    def _per_modality(self, x, n_image, image_fn, text_fn):
        if not self.experts:
            return image_fn(x)
        if n_image == 0:
            return text_fn(x)
        if n_image == x.shape[1]:
            return image_fn(x)
        return torch.cat([image_fn(x[:, :n_image]), text_fn(x[:, n_image:])], dim=1)

    def forward(self, x, n_image: int, layout: AttentionLayout, layer: int, backend: str,
                cache: KVCache | None = None, query_index: torch.Tensor | None = None):
        """x: (B, L, D) with its first ``n_image`` tokens image tokens (0 on cached decode steps).
        query_index (B,): compute only that position of each row (single-modality layouts) -> (B, 1, D)."""
        h = self._per_modality(x, n_image, self.norm1, lambda t: self.text_norm1(t))  # (B, L, D)
        if query_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), query_index].unsqueeze(1)  # (B, 1, D)
            n_image = min(n_image, 1)
        x = x + self.attn(h, layout, layer, backend, cache, query_index)  # (B, L or 1, D)
        h = self._per_modality(x, n_image, lambda t: self.mlp(self.norm2(t)),
                               lambda t: self.text_mlp(self.text_norm2(t)))
        return x + h


@dataclass
class BackboneOutput:
    """Final-normed hidden states per modality, and raw hidden states after selected blocks."""

    image: torch.Tensor | None  # (B, Ni, D): cls first, then kept patches
    text: torch.Tensor | None  # (B, T, D)
    layout: AttentionLayout
    layer_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> (B, L, D) after k blocks
    keep_idx: torch.Tensor | None = None  # (B, n_keep) patch indices that entered, if dropped


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) patch tokens by one strided convolution; timm's ``patch_embed.proj``
    name and layout (written here rather than imported: timm's import costs the trainer ~40 MB)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class VLBackbone(nn.Module):
    """Patch/text embeddings, a stack of shared blocks and the final norm(s)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}.")
        self.cfg = cfg
        D = cfg.width
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_chans, D)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, D) * 0.02)
        self.text_embed = nn.Embedding(cfg.vocab_size, D)
        self.text_pos_embed = nn.Parameter(torch.randn(1, cfg.max_text_len, D) * 0.01)
        self.modality_embed = nn.Parameter(torch.zeros(2, D))  # [image, text]; zero keeps timm parity
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()  # timm's name
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        if cfg.modality_experts:
            self.text_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn_backend = resolve_backend(cfg.attn_backend)
        self.gradient_checkpointing = False  # the attribute HF's activation_checkpointing_enable sets
        self.low_precision_emulation: Callable[[], contextlib.AbstractContextManager] | None = None

    # -- switches -----------------------------------------------------------------------------
    def set_attn_backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend '{name}'; valid: {', '.join(BACKENDS)}.")
        self.attn_backend = name

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.gradient_checkpointing = enable

    def set_low_precision_emulation(self, make_mode: Callable[[], contextlib.AbstractContextManager] | None) -> None:
        """Tell the model that it runs under a trainer's emulated bf16/fp16 (``make_mode()`` makes the
        context the trainer enters around each step; vlpretrain.train.precision), so that the work done
        outside that context runs the same way: gradient checkpointing's recomputation in the backward
        enters a fresh one, and the MLPs run their own backward's matmuls on fp32 kernels. None: off."""
        self.low_precision_emulation = make_mode
        for module in self.modules():
            if isinstance(module, Mlp):
                module.emulate_low_precision = make_mode is not None

    def _checkpoint_contexts(self):
        """``context_fn`` for ``torch.utils.checkpoint``: the recomputation runs under the emulation (a
        mode entered around the step does not reach the backward)."""
        return contextlib.nullcontext(), self.low_precision_emulation()

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "text_pos_embed", "modality_embed", "text_embed.weight"}

    # -- input checks -------------------------------------------------------------------------
    def check_pixels(self, pixel_values: torch.Tensor, any_size: bool = False) -> None:
        """The model's (B, C, S, S); with ``any_size``, any square side that is a multiple of the patch."""
        c = self.cfg
        want = (c.in_chans, c.image_size, c.image_size)
        side = pixel_values.shape[-1] if pixel_values.dim() == 4 else 0
        if any_size and pixel_values.dim() == 4 and side % c.patch_size == 0 and side > 0:
            want = (c.in_chans, side, side)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (B, {want[0]}, "
                             f"{want[1]}, {want[2]}) for this model (resize images with VLProcessor).")

    def check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, offset: int = 0):
        c = self.cfg
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (B, T).")
        if input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}.")
        if offset + input_ids.shape[1] > c.max_text_len:
            raise ValueError(f"input_ids has {offset + input_ids.shape[1]} positions; the model's "
                             f"max_text_len is {c.max_text_len} (truncate the text).")
        # the id range, asserted on the device: an accelerator reports it without the host waiting for the
        # result (a sync every forward); left out of torch.compile's graphs
        if input_ids.numel() and not torch.compiler.is_compiling():
            torch._assert_async(((input_ids >= 0) & (input_ids < c.vocab_size)).all(),
                                f"input_ids holds an id outside 0 <= id < vocab_size={c.vocab_size} "
                                f"(does the tokenizer match the model?)")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"{tuple(input_ids.shape)}, the shape of input_ids.")

    # -- embeddings ---------------------------------------------------------------------------
    def random_keep(self, batch: int, keep: int, device, num_patches: int | None = None,
                    seeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, keep) random patch indices (of ``num_patches``, the model's by default), sorted, for FLIP
        patch dropout or MAE masking; drawn per row from ``seeds`` (B,) when given (layers/draws.py)."""
        noise = draw_uniform(seeds, "patch_dropout", batch, (num_patches or self.num_patches,), device=device)
        return noise.argsort(dim=1)[:, :keep].sort(dim=1).values

    def patch_positions(self, grid: int) -> torch.Tensor:
        """(1, grid * grid, D) patch position embeddings; resampled bicubically (as timm's
        ``resample_abs_pos_embed``) when ``grid`` differs from the model's, e.g. for small crops."""
        pos = self.pos_embed[:, 1:]  # (1, N, D)
        own = self.cfg.image_size // self.cfg.patch_size
        if grid == own:
            return pos
        square = pos.reshape(1, own, own, -1).permute(0, 3, 1, 2).float()  # (1, D, own, own)
        square = nn.functional.interpolate(square, size=(grid, grid), mode="bicubic", antialias=True,
                                           align_corners=False)
        return square.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)

    def embed_image(self, pixel_values, keep_idx=None, patch_mask=None, mask_token=None):
        """(B, C, H, W) -> (B, 1 + n_keep, D): cls token first, then the kept patches (``norm_pre`` last).
        patch_mask (B, N) bool with mask_token (D,): those patch embeddings become the token, before positions
        are added (BEiT / iBOT masked image modelling)."""
        x = self.patch_embed(pixel_values)  # (B, N, D)
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], mask_token.to(x.dtype), x)
        x = x + self.patch_positions(pixel_values.shape[-1] // self.cfg.patch_size)  # (B, N, D)
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.norm_pre(torch.cat([cls, x], dim=1) + self.modality_embed[0])  # (B, 1 + n_keep, D)

    def embed_text(self, input_ids, offset: int = 0):
        """(B, T) -> (B, T, D), positions counted from ``offset`` (cached tokens)."""
        T = input_ids.shape[1]
        return self.text_embed(input_ids) + self.text_pos_embed[:, offset:offset + T] + self.modality_embed[1]

    def final_norm(self, hidden: torch.Tensor, n_image: int):
        """Apply the final norm(s) to raw hidden states (B, L, D) -> (image part, text part)."""
        img = self.norm(hidden[:, :n_image]) if n_image else None
        text_norm = self.text_norm if self.cfg.modality_experts else self.norm
        txt = text_norm(hidden[:, n_image:]) if hidden.shape[1] > n_image else None
        return img, txt

    def _pooled_index(self, pooled_only: bool, kind: str, x, attention_mask, cache, output_layers, depth):
        """(B,) positions the last block computes when ``pooled_only``, else None."""
        if not pooled_only:
            return None
        if kind not in ("image", "text") or cache is not None or depth in output_layers or depth < 1:
            raise ValueError(f"pooled_only serves the 'image' and 'text' layouts at depth >= 1 without a cache or "
                             f"the last block's hidden states; got layout '{kind}', depth {depth}.")
        B, L = x.shape[:2]
        if kind == "image":
            return torch.full((B,), IMAGE_POOL_INDEX, dtype=torch.long, device=x.device)
        return text_pool_index(B, L, attention_mask, x.device)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, *, layout: str | None = None,
                text_causal: bool | torch.Tensor = True, cross_from_layer: int = 0, keep_idx=None,
                depth: int | None = None, output_layers: tuple[int, ...] = (), cache: KVCache | None = None,
                pooled_only: bool = False, patch_mask: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None, any_size: bool = False,
                seeds: torch.Tensor | None = None) -> BackboneOutput:
        """Run the first ``depth`` blocks (all by default) on image and/or text under a layout.

        layout: image | text | prefix_lm | fused | separate; default from the inputs given
        (image only: image, text only: text, both: prefix_lm). ``cache`` enables incremental
        decoding: the first call fills it, later calls pass only the new ``input_ids``.
        text_causal: causal text (True), bidirectional (False), or a (B,) bool tensor, per sequence.
        pooled_only (``image`` / ``text`` layouts): the last block computes only the token each
        sequence is pooled at (cls; last real token), so ``image`` / ``text`` come out (B, 1, D):
        the same pooled states for ~3/4 less of the last block's matmuls and activations.
        patch_mask (B, N) bool + mask_token (D,): masked patches read the token (no patch dropout then).
        any_size: images of any square side that is a multiple of the patch (positions resampled).
        seeds: int64 (B,) per-row seeds of this call's patch dropout (each call its own, e.g.
        ``draws.fork(batch_seeds, name)``); None: torch's generator.
        """
        decoding = cache is not None and cache.layers
        if pixel_values is None and input_ids is None:
            raise ValueError("pass pixel_values, input_ids or both.")
        parts, n_image = [], 0
        if pixel_values is not None:
            self.check_pixels(pixel_values, any_size)
            if (patch_mask is None) != (mask_token is None):
                raise ValueError("patch_mask and mask_token go together: pass both (or neither).")
            if patch_mask is not None and tuple(patch_mask.shape) != (pixel_values.shape[0], self.num_patches):
                raise ValueError(f"patch_mask has shape {tuple(patch_mask.shape)}; expected (B, N) = "
                                 f"({pixel_values.shape[0]}, {self.num_patches}).")
            if keep_idx is None and patch_mask is None and self.training and self.cfg.patch_dropout > 0:
                n_patches = (pixel_values.shape[-1] // self.cfg.patch_size) ** 2  # the model's, or a crop's
                n_keep = max(1, int(round(n_patches * (1 - self.cfg.patch_dropout))))
                keep_idx = self.random_keep(pixel_values.shape[0], n_keep, pixel_values.device, n_patches, seeds)
            parts.append(self.embed_image(pixel_values, keep_idx, patch_mask, mask_token))
            n_image = parts[0].shape[1]
        offset = cache.n_text if decoding else 0
        text_valid = None
        if input_ids is not None:
            self.check_text(input_ids, attention_mask, offset)
            parts.append(self.embed_text(input_ids, offset))
            text_valid = attention_mask.bool() if attention_mask is not None else None
        if decoding:
            n_image, kind, cross_from_layer = cache.n_image, cache.kind, cache.cross_from_layer
        else:
            kind = layout or ("prefix_lm" if len(parts) == 2 else ("image" if pixel_values is not None else "text"))
        n_text = input_ids.shape[1] + offset if input_ids is not None else 0
        if cache is not None and text_valid is not None:  # (generation only: reads the mask on the host)
            if not bool(text_valid.all()):
                raise ValueError("attention_mask with padding is not supported with a KV cache (cached steps would "
                                 "attend to the pad keys); decode prompts of equal length, or without cache.")
            text_valid = None  # nothing padded: masks without a batch dimension
        spec = AttentionLayout(kind, n_image, n_text, text_causal, text_valid, cross_from_layer)
        x = torch.cat(parts, dim=1)  # (B, L, D)
        if cache is not None:
            cache.n_image, cache.n_text, cache.kind, cache.cross_from_layer = n_image, n_text, kind, cross_from_layer

        depth = self.cfg.depth if depth is None else depth
        n_img_here = 0 if decoding else n_image
        pooled_index = self._pooled_index(pooled_only, kind, x, attention_mask, cache, output_layers, depth)
        hidden = {}
        for i, block in enumerate(self.blocks[:depth]):
            if i in output_layers:
                hidden[i] = x
            index = pooled_index if i == depth - 1 else None
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                # (torch.compile recomputes from its traced graph, emulation included, and takes no context_fn)
                emulated = self.low_precision_emulation is not None and not torch.compiler.is_compiling()
                context = {"context_fn": self._checkpoint_contexts} if emulated else {}
                x = checkpoint(block, x, n_img_here, spec, i, self.attn_backend, None, index, use_reentrant=False,
                               **context)
            else:
                x = block(x, n_img_here, spec, i, self.attn_backend, cache, index)
        if pooled_index is not None:
            n_img_here = min(n_img_here, 1)
        if depth in output_layers:
            hidden[depth] = x
        img, txt = self.final_norm(x, n_img_here)
        return BackboneOutput(img, txt, spec, hidden, keep_idx)
