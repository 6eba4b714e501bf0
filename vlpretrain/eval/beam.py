"""Beam search captioning for the evaluation, and caption log-probabilities.

The search itself is :func:`vlpretrain.models.generation.decode_beams` (also behind ``VLModel.generate(
num_beams=K)``): hypotheses ranked by their summed token log-probability (EOS included, nothing after it),
with no length penalty, so a beam's score is directly comparable with greedy decoding's.
"""

from __future__ import annotations

import torch

from vlpretrain.models.generation import decode_beams


@torch.no_grad()
def beam_search(model, pixel_values: torch.Tensor, beams: int = 4, max_new_tokens: int = 30):
    """(B, C, H, W) -> (ids (B, T) starting with BOS, padded after EOS; scores (B,) summed log-probs)."""
    if beams < 1:
        raise ValueError(f"--beams {beams}: use 1 (greedy) or more.")
    cfg = model.config
    prompt = torch.full((pixel_values.shape[0], 1), cfg.bos_token_id, dtype=torch.long, device=pixel_values.device)
    steps = min(max_new_tokens, cfg.max_text_len - 1)
    return decode_beams(model, pixel_values, prompt, steps, beams, 0.0, cfg.pad_token_id, [cfg.eos_token_id])


@torch.no_grad()
def caption_logprob(model, pixel_values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probability of captions ``ids`` (B, T) (BOS first; tokens after EOS ignored),
    from one teacher-forced forward without cache: an independent check of decoding scores."""
    cfg = model.config
    after_eos = (ids == cfg.eos_token_id).long().cumsum(1) - (ids == cfg.eos_token_id).long() > 0  # (B, T)
    logits = model(pixel_values=pixel_values, input_ids=ids).logits.float()  # (B, T, V)
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return logp.masked_fill(after_eos[:, 1:], 0.0).sum(1)
