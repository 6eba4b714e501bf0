"""Beam search captioning on the KV-cached decoder of :class:`VLModel`, and caption log-probabilities.

Hypotheses are ranked by their summed token log-probability (EOS included, nothing after it), with
no length penalty, so a beam's score is directly comparable with greedy decoding's. Each image runs
``beams`` rows; after every step the rows and their KV cache are reordered to the surviving beams.
"""

from __future__ import annotations

import torch

from vlpretrain.layers.attention import KVCache


def _reorder(cache: KVCache, rows: torch.Tensor) -> None:
    """Keep cache rows ``rows`` (flat beam indices) in every layer."""
    cache.layers = {i: (k.index_select(0, rows), v.index_select(0, rows)) for i, (k, v) in cache.layers.items()}


@torch.no_grad()
def beam_search(model, pixel_values: torch.Tensor, beams: int = 4, max_new_tokens: int = 30):
    """(B, C, H, W) -> (ids (B, T) starting with BOS, padded after EOS; scores (B,) summed log-probs)."""
    if beams < 1:
        raise ValueError(f"--beams {beams}: use 1 (greedy) or more.")
    cfg = model.config
    B, device = pixel_values.shape[0], pixel_values.device
    steps = min(max_new_tokens, cfg.max_text_len - 1)
    pixels = pixel_values.repeat_interleave(beams, dim=0)  # (B*K, C, H, W)
    seq = torch.full((B * beams, 1), cfg.bos_token_id, dtype=torch.long, device=device)
    scores = torch.full((B, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    done = torch.zeros(B * beams, dtype=torch.bool, device=device)
    cache, step_ids, step_pixels = KVCache(), seq, pixels
    for _ in range(steps):
        out = model.backbone(pixel_values=step_pixels, input_ids=step_ids, layout="prefix_lm",
                             cross_from_layer=cfg.text_embed_depth, cache=cache)
        logp = model.lm_head(out.text[:, -1]).float().log_softmax(-1)  # (B*K, V)
        finished = torch.full_like(logp, float("-inf"))
        finished[:, cfg.pad_token_id] = 0.0  # a finished beam continues with pad at no cost
        logp = torch.where(done[:, None], finished, logp)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(B, beams, V)).view(B, beams * V)  # (B, K*V)
        scores, flat = cand.topk(beams, dim=1)  # (B, K)
        rows = (flat // V + torch.arange(B, device=device)[:, None] * beams).view(-1)  # (B*K,) source beams
        tokens = (flat % V).view(-1)  # (B*K,)
        seq = torch.cat([seq.index_select(0, rows), tokens[:, None]], dim=1)
        done = done.index_select(0, rows) | (tokens == cfg.eos_token_id)
        _reorder(cache, rows)
        if bool(done.all()):
            break
        step_ids, step_pixels = tokens[:, None], None
    best = scores.argmax(1)  # (B,)
    pick = best + torch.arange(B, device=device) * beams
    return seq.index_select(0, pick), scores.gather(1, best[:, None])[:, 0]


@torch.no_grad()
def caption_logprob(model, pixel_values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probability of captions ``ids`` (B, T) (BOS first; tokens after EOS ignored),
    from one teacher-forced forward without cache: an independent check of decoding scores."""
    cfg = model.config
    after_eos = (ids == cfg.eos_token_id).long().cumsum(1) - (ids == cfg.eos_token_id).long() > 0  # (B, T)
    logits = model(pixel_values=pixel_values, input_ids=ids).logits.float()  # (B, T, V)
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return logp.masked_fill(after_eos[:, 1:], 0.0).sum(1)
