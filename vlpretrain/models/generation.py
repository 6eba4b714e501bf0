"""Caption generation on the KV-cached prefix-LM decoder of :class:`VLModel`, with transformers' argument names.

The image is a prefix the text attends to; the text given (``input_ids``) is a prompt after it. A prompt
from the processor ends with EOS (it encodes whole captions), which is dropped so that generation
continues the prompt; padding is dropped too. Rows with prompts of different lengths are decoded in
groups of equal length (text positions count from the first token, so prompts cannot be left-padded)
and the outputs are right-padded with the pad id. The output is prompt + new tokens, as transformers'
decoder-only models return it.

Why not transformers' ``GenerationMixin``: the decoder state is our :class:`KVCache` (image prefix and
layout carried with it), not a transformers ``Cache``, and its beam search keeps finished hypotheses
apart from the running beams, which would change the beams the evaluation reports. So the decoding
loops live here; the parameters are resolved by a transformers ``GenerationConfig`` and sampling uses
transformers' logits warpers (temperature, top-k, top-p), so the names and their meaning are the same.

Decoding: greedy (default), sampling (``do_sample``), beam search (``num_beams`` > 1). Beam search ranks
hypotheses by summed token log-probability (EOS included, nothing after it): a finished beam keeps its
slot and continues with pad at no cost. The final pick divides each beam's sum by its generated length
to the power ``length_penalty``, which defaults to 0 here (plain sums, comparable with greedy's; pass
``length_penalty=1.0`` for transformers' default per-token average).
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlpretrain.layers.attention import KVCache

# transformers' global defaults for what this module implements, except length_penalty (see module doc)
DEFAULTS = {"max_length": 20, "do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
            "length_penalty": 0.0, "use_cache": True, "return_dict_in_generate": False}
_IDENTITY_KEYS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_new_tokens",
                  "transformers_version"}


def resolve_config(default: GenerationConfig | None, given: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    """``given`` (or the model's ``default``) updated with ``kwargs``; unset fields filled from
    :data:`DEFAULTS`. Arguments generate does not know, or options it does not implement set to a
    non-default value, are errors naming them."""
    gen = copy.deepcopy(given if given is not None else (default or GenerationConfig()))
    unknown = gen.update(**kwargs)
    if unknown:
        raise ValueError(f"generate() got arguments it does not use: {sorted(unknown)}. It takes pixel_values, "
                         "input_ids, attention_mask and GenerationConfig fields.")
    for key, value in DEFAULTS.items():
        if getattr(gen, key, None) is None:
            setattr(gen, key, value)
    plain = GenerationConfig._get_default_generation_params()
    unsupported = {k: v for k, v in gen.to_diff_dict().items() if k not in DEFAULTS and k not in _IDENTITY_KEYS
                   and not k.startswith("_") and v not in (None, False) and v != plain.get(k)}
    if unsupported:
        raise ValueError(f"generate() does not implement {unsupported}; it offers greedy, sampling (temperature, "
                         "top_k, top_p) and beam search (num_beams, length_penalty).")
    return gen


def prompts_of(input_ids, attention_mask, bos: int, eos: int, batch: int, device) -> list[torch.Tensor]:
    """Each row's prompt: its real tokens (``attention_mask``, padded on either side) without a final EOS;
    BOS alone if none given."""
    if input_ids is None:
        return [torch.tensor([bos], device=device) for _ in range(batch)]
    if input_ids.shape[0] != batch:
        raise ValueError(f"input_ids has {input_ids.shape[0]} rows for {batch} images.")
    rows = list(input_ids) if attention_mask is None else [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]
    rows = [r[:-1] if len(r) > 1 and int(r[-1]) == eos else r for r in rows]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt is empty; give at least BOS (the processor adds it).")
    return rows


def _warpers(gen: GenerationConfig) -> LogitsProcessorList:
    """transformers' sampling warpers, in transformers' order."""
    warpers = LogitsProcessorList()
    if gen.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_k:
        warpers.append(TopKLogitsWarper(gen.top_k))
    if gen.top_p < 1.0:
        warpers.append(TopPLogitsWarper(gen.top_p))
    return warpers


def _step(model, pixels, ids, cache):
    """Next-token logits (B, V) float32 after the image prefix and ``ids`` (the new ones when cached)."""
    out = model.backbone(pixel_values=pixels, input_ids=ids, layout="prefix_lm",
                         cross_from_layer=model.config.text_embed_depth, cache=cache)
    return model.lm_head(out.text[:, -1]).float()


def decode_greedy_or_sample(model, pixel_values, prompt, steps: int, gen: GenerationConfig, use_cache: bool = True):
    """(B, P) prompt -> (B, P + n) with n <= steps new tokens, padded after EOS."""
    eos = torch.tensor(_eos_ids(gen), device=prompt.device)
    warpers = _warpers(gen) if gen.do_sample else None
    cache = KVCache() if use_cache else None
    seq, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    step_ids, step_pixels = prompt, pixel_values
    for _ in range(steps):
        logits = _step(model, step_pixels, step_ids, cache)  # (B, V)
        if warpers is None:
            nxt = logits.argmax(-1)  # (B,)
        else:
            nxt = torch.multinomial(warpers(seq, logits).softmax(-1), 1)[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, gen.pad_token_id), nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()):
            break
        step_ids, step_pixels = (nxt[:, None], None) if use_cache else (seq, pixel_values)
    return seq


def _reorder(cache: KVCache, rows: torch.Tensor) -> None:
    """Keep cache rows ``rows`` (flat beam indices) in every layer."""
    cache.layers = {i: (k.index_select(0, rows), v.index_select(0, rows)) for i, (k, v) in cache.layers.items()}


def decode_beams(model, pixel_values, prompt, steps: int, beams: int, length_penalty: float, pad: int, eos_ids):
    """(B, P) prompt -> (ids (B, P + n) padded after EOS, scores (B,) of the picked beams: summed log-probs
    divided by generated length ** ``length_penalty``, transformers' ``sequences_scores``)."""
    if beams < 1:
        raise ValueError(f"num_beams={beams}: use 1 (greedy) or more.")
    B, device = prompt.shape[0], prompt.device
    eos = torch.tensor(list(eos_ids), device=device)
    pixels = pixel_values.repeat_interleave(beams, dim=0)  # (B*K, C, H, W)
    seq = prompt.repeat_interleave(beams, dim=0)  # (B*K, P)
    scores = torch.full((B, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    done = torch.zeros(B * beams, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * beams, device=device)  # generated tokens up to and including EOS
    cache, step_ids, step_pixels = KVCache(), seq, pixels
    for _ in range(steps):
        logp = _step(model, step_pixels, step_ids, cache).log_softmax(-1)  # (B*K, V)
        finished = torch.full_like(logp, float("-inf"))
        finished[:, pad] = 0.0  # a finished beam continues with pad at no cost
        logp = torch.where(done[:, None], finished, logp)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(B, beams, V)).view(B, beams * V)  # (B, K*V)
        scores, flat = cand.topk(beams, dim=1)  # (B, K)
        rows = (flat // V + torch.arange(B, device=device)[:, None] * beams).view(-1)  # (B*K,) source beams
        tokens = (flat % V).view(-1)  # (B*K,)
        seq = torch.cat([seq.index_select(0, rows), tokens[:, None]], dim=1)
        lengths = lengths.index_select(0, rows) + (~done.index_select(0, rows)).float()
        done = done.index_select(0, rows) | torch.isin(tokens, eos)
        _reorder(cache, rows)
        if bool(done.all()):
            break
        step_ids, step_pixels = tokens[:, None], None
    ranked = scores / lengths.view(B, beams).clamp(min=1) ** length_penalty if length_penalty else scores
    best = ranked.argmax(1)  # (B,)
    pick = best + torch.arange(B, device=device) * beams
    return seq.index_select(0, pick), ranked.gather(1, best[:, None])[:, 0]


def _eos_ids(gen: GenerationConfig) -> list[int]:
    eos = gen.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


@torch.no_grad()
def generate(model, pixel_values, input_ids=None, attention_mask=None, gen: GenerationConfig | None = None,
             use_cache: bool = True):
    """Captions (B, T): prompt + new tokens, right-padded; a ``GenerateDecoderOnlyOutput`` (beam search:
    ``GenerateBeamDecoderOnlyOutput`` with ``sequences_scores``) when ``gen.return_dict_in_generate``."""
    if pixel_values is None:
        raise ValueError("generate() needs pixel_values: captions are conditioned on an image.")
    cfg = model.config
    B, device = pixel_values.shape[0], pixel_values.device
    prompts = prompts_of(input_ids, attention_mask, gen.bos_token_id, _eos_ids(gen)[0], B, device)
    beams = gen.num_beams
    if beams > 1 and gen.do_sample:
        raise ValueError("do_sample=True with num_beams > 1 (beam sampling) is not implemented; choose one.")
    outputs, scores = [None] * B, torch.zeros(B, device=device)
    for length in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == length]
        new = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length - length
        steps = min(new, cfg.max_text_len - length)
        if steps <= 0:
            raise ValueError(f"no room to generate: a prompt of {length} tokens, max_new_tokens={gen.max_new_tokens}, "
                             f"max_length={gen.max_length}, and the model's max_text_len={cfg.max_text_len}.")
        prompt, pixels = torch.stack([prompts[i] for i in rows]), pixel_values[rows]  # (b, P), (b, C, H, W)
        if beams > 1:
            seq, best = decode_beams(model, pixels, prompt, steps, beams, gen.length_penalty, gen.pad_token_id,
                                     _eos_ids(gen))
            scores[rows] = best
        else:
            seq = decode_greedy_or_sample(model, pixels, prompt, steps, gen, use_cache)
        for i, row in zip(rows, seq):
            outputs[i] = row
    width = max(len(r) for r in outputs)
    sequences = torch.full((B, width), gen.pad_token_id, dtype=torch.long, device=device)
    for i, row in enumerate(outputs):
        sequences[i, :len(row)] = row
    if not gen.return_dict_in_generate:
        return sequences
    if beams > 1:
        return GenerateBeamDecoderOnlyOutput(sequences=sequences, sequences_scores=scores)
    return GenerateDecoderOnlyOutput(sequences=sequences)
