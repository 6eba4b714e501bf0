"""Loss maths against references: open_clip's ClipLoss / SigLipLoss, MAE's published formula, and
hand-computed shifted cross-entropy; plus the corruption and masking helpers' guarantees."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from objectives_support import make_model, random_batch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from vlpretrain.objectives import build_objectives
from vlpretrain.objectives.functional import (
    IGNORE_INDEX,
    clip_loss,
    mae_loss,
    mask_tokens,
    masked_token_loss,
    norm_pix_target,
    patchify,
    random_masking,
    retrieval_accuracy,
    siglip_loss,
)
from vlpretrain.objectives.masked_image import PixelDecoder
from vlpretrain.objectives.shared import shared_forward


def _features(b=8, e=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, e, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, e, generator=g), dim=-1).requires_grad_()
    t = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    return img, txt, t, bias


def _loss_and_grads(fn, img, txt, t, bias):
    loss = fn(img, txt, t.exp(), bias)
    grads = torch.autograd.grad(loss, [img, txt, t, bias], allow_unused=True)
    return loss.detach(), [g if g is not None else torch.zeros(()) for g in grads]


def _assert_parity(ours, ref, tol=1e-5):
    (l1, g1), (l2, g2) = ours, ref
    assert abs(float(l1 - l2)) < tol, (float(l1), float(l2))
    for a, b in zip(g1, g2):
        assert float((a - b).abs().max()) < tol


@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_matches_open_clip(with_bias):
    img, txt, t, bias = _features()
    bias_arg = bias if with_bias else None
    ours = _loss_and_grads(lambda i, x, s, b: clip_loss(i, x, i, x, s, bias_arg), img, txt, t, bias)
    ref = _loss_and_grads(lambda i, x, s, b: ClipLoss()(i, x, s, bias_arg), img, txt, t, bias)
    _assert_parity(ours, ref)
    assert float(ours[1][2].abs()) > 1e-4  # the scale gets a real gradient


@pytest.mark.parametrize("chunk", [0, 3, 8])
def test_siglip_matches_open_clip(chunk):
    img, txt, t, bias = _features(seed=1)
    t = torch.tensor(math.log(10.0), requires_grad=True)
    ours = _loss_and_grads(lambda i, x, s, b: siglip_loss(i, x, s, b, 0, chunk), img, txt, t, bias)
    ref = _loss_and_grads(lambda i, x, s, b: SigLipLoss()(i, x, s, b), img, txt, t, bias)
    _assert_parity(ours, ref)


def test_local_losses_average_to_the_whole_batch_loss():
    """Rows of 'rank' r against all columns, labels offset by r*b: the mean is the full loss (and gradient)."""
    img, txt, t, bias = _features(b=8, seed=2)
    for fn in (lambda i, x, ia, xa, s, b, off: clip_loss(i, x, ia, xa, s, None, off),
               lambda i, x, ia, xa, s, b, off: siglip_loss(i, xa, s, b, off, 3)):
        full = fn(img, txt, img, txt, t.exp(), bias, 0)
        parts = [fn(img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], img, txt, t.exp(), bias, r * 4) for r in (0, 1)]
        mean = (parts[0] + parts[1]) / 2
        assert abs(float((full - mean).detach())) < 1e-6
        g_full = torch.autograd.grad(full, [img, txt, t])
        g_mean = torch.autograd.grad(mean, [img, txt, t])
        assert all(float((a - b).abs().max()) < 1e-6 for a, b in zip(g_full, g_mean))


def test_retrieval_accuracy_is_over_the_gathered_pool_not_the_local_rows():
    """Two 'ranks' of 2 pairs each: every pair is right within its own rank's rows, but image 2 is
    closer to text 0 and text 0 to image 2 (on the other rank): the pool accuracy is 3/4 both ways."""
    text = torch.eye(4)
    image = torch.eye(4)
    image[2, 0] = 2.0  # image 2: text 0 scores 2, its own text 2 scores 1
    pooled = [retrieval_accuracy(image[r * 2:(r + 1) * 2], text[r * 2:(r + 1) * 2], image, text, r * 2)
              for r in (0, 1)]
    local = [retrieval_accuracy(image[r * 2:(r + 1) * 2], text[r * 2:(r + 1) * 2]) for r in (0, 1)]
    assert [tuple(map(float, acc)) for acc in local] == [(1.0, 1.0), (1.0, 1.0)]
    assert [tuple(map(float, acc)) for acc in pooled] == [(1.0, 0.5), (0.5, 1.0)]
    # the ranks' mean is the accuracy over the whole pool, here and on random embeddings
    for img, txt, ranks in [(image, text, 2), (torch.randn(12, 8), torch.randn(12, 8), 3)]:
        b = len(img) // ranks
        parts = [retrieval_accuracy(img[r * b:(r + 1) * b], txt[r * b:(r + 1) * b], img, txt, r * b)
                 for r in range(ranks)]
        whole = retrieval_accuracy(img, txt)
        for direction in (0, 1):
            assert abs(sum(float(p[direction]) for p in parts) / ranks - float(whole[direction])) < 1e-6
    assert tuple(map(float, retrieval_accuracy(image, text))) == (0.75, 0.75)


def _mae_reference(imgs, pred, mask, p):
    """MAE's forward_loss with norm_pix_loss=True, as published (He et al., facebookresearch/mae)."""
    n, h = imgs.shape[0], imgs.shape[2] // p
    x = imgs.reshape(n, 3, h, p, h, p)
    x = torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * h, p ** 2 * 3)
    mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
    target = (x - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def test_mae_loss_matches_published_formula():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 3, 32, 32, generator=g)
    pred = torch.randn(3, 16, 8 * 8 * 3, generator=g)
    _, mask, _ = random_masking(3, 16, 0.75, generator=g)
    ours = mae_loss(pred, norm_pix_target(patchify(imgs, 8)), mask)
    assert abs(float(ours - _mae_reference(imgs, pred, mask, 8))) < 1e-6
    assert mask.sum(1).tolist() == [12.0, 12.0, 12.0]


def test_patchify_follows_patch_embed_order():
    imgs = torch.randn(2, 3, 32, 32)
    cols = F.unfold(imgs, kernel_size=8, stride=8)  # (B, C*p*p, P), patches row-major, pixels (c, i, j)
    ours = patchify(imgs, 8).reshape(2, 16, 8, 8, 3).permute(0, 1, 4, 2, 3).reshape(2, 16, -1)
    assert torch.equal(ours, cols.transpose(1, 2))


def test_random_masking_and_decoder_restore_positions():
    keep_idx, mask, ids_restore = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(3))
    assert keep_idx.shape == (4, 4)
    for b in range(4):
        assert set(keep_idx[b].tolist()) == set((mask[b] == 0).nonzero()[:, 0].tolist())
    # a decoder reduced to its restore step puts each visible token back at its patch, mask tokens elsewhere
    dec = PixelDecoder(in_width=8, width=8, depth=0, heads=1, grid=4, patch_dim=8)
    with torch.no_grad():
        dec.embed.weight.copy_(torch.eye(8))
        dec.embed.bias.zero_()
        dec.pos_embed.zero_()
    dec.norm, dec.pred = nn.Identity(), nn.Identity()
    tokens = torch.randn(4, 5, 8)
    out = dec(tokens, ids_restore)  # (4, 16, 8)
    for b in range(4):
        for j, patch in enumerate(keep_idx[b].tolist()):
            assert torch.equal(out[b, patch], tokens[b, 1 + j])
        hidden = (mask[b] == 1).nonzero()[:, 0]
        assert torch.equal(out[b, hidden], dec.mask_token[0].expand(len(hidden), -1).detach())


def _hand_shifted_ce(logits, ids, mask, per_caption=False):
    rows = []
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        terms = [-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for t in range(n - 1)]
        rows.append(terms)
    if per_caption:
        return torch.stack([torch.stack(r).mean() for r in rows if r]).mean()
    return torch.stack([x for r in rows for x in r]).mean()


@pytest.mark.parametrize("per_caption", [False, True])
def test_captioning_matches_hand_computed_shifted_ce(per_caption):
    model = make_model(text_embed_depth=1).eval()
    batch = random_batch(batch=5, length=9)
    (obj,) = build_objectives([{"name": "captioning", "per_caption": per_caption}], model.config)
    shared = shared_forward(model, batch, obj.needs)
    loss = obj(model, batch, shared).loss
    logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).logits
    ref = _hand_shifted_ce(logits, batch["input_ids"], batch["attention_mask"], per_caption)
    assert abs((loss - ref).item()) < 1e-5
    # the two reductions differ on ragged captions, so the option is really applied
    other = _hand_shifted_ce(logits, batch["input_ids"], batch["attention_mask"], not per_caption)
    assert abs((ref - other).item()) > 1e-4


def test_cappa_parallel_prediction_reads_only_mask_tokens():
    model = make_model()
    (obj,) = build_objectives([{"name": "captioning", "parallel_prob": 1.0}], model.config)
    obj.train()
    batch = random_batch(batch=4, length=8)
    altered = {**batch, "input_ids": batch["input_ids"].clone()}
    altered["input_ids"][:, 1:4] = 7  # other caption tokens, same padding
    s1, s2 = obj._parallel_states(model, batch), obj._parallel_states(model, altered)
    assert torch.allclose(s1, s2, atol=1e-6)  # the input tokens are never seen
    masked = torch.where(batch["attention_mask"].bool(), 4, batch["input_ids"])
    ref = model.backbone(batch["pixel_values"], masked, batch["attention_mask"], layout="prefix_lm",
                         text_causal=False).text
    assert torch.allclose(s1, ref, atol=1e-6)
    loss = obj(model, batch, None).loss
    hand = _hand_shifted_ce(model.lm_head(ref), batch["input_ids"], batch["attention_mask"])
    assert abs((loss - hand).item()) < 1e-5
    obj.eval()  # evaluation predicts autoregressively
    causal = model.backbone(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], layout="prefix_lm").text
    assert torch.allclose(obj._parallel_states(model, batch), causal, atol=1e-6)


def test_cappa_mixes_parallel_and_causal_captions_in_one_pass():
    model = make_model(text_embed_depth=1)
    (obj,) = build_objectives([{"name": "captioning", "parallel_prob": 0.5}], model.config)
    obj.train()
    batch = random_batch(batch=8, length=8)
    torch.manual_seed(3)
    parallel = torch.rand(8) < 0.5  # the draw the objective makes next
    assert 0 < int(parallel.sum()) < 8
    torch.manual_seed(3)
    states = obj._parallel_states(model, batch)
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    masked = torch.where(mask.bool(), 4, ids)
    for row in range(8):  # each caption alone, run the way its draw says
        sub = dict(layout="prefix_lm", cross_from_layer=1, text_causal=not bool(parallel[row]))
        source = masked if parallel[row] else ids
        ref = model.backbone(px[row:row + 1], source[row:row + 1], mask[row:row + 1], **sub).text
        assert torch.allclose(states[row:row + 1], ref, atol=1e-5), row


def test_mask_tokens_never_touches_specials_and_splits_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(5, 1000, (400, 50), generator=g), torch.ones(400, 50, dtype=torch.long)
    ids[:, 0], ids[:, -1], ids[:, 40:49], mask[:, 40:49] = 1, 2, 0, 0
    candidates = mask.bool() & (ids > 4)
    corrupted, labels = mask_tokens(ids, candidates, 0.3, 4, 1000, generator=g)
    selected = labels != IGNORE_INDEX
    assert not selected[~candidates].any()
    assert torch.equal(corrupted[~selected], ids[~selected])
    assert torch.equal(labels[selected], ids[selected])
    assert abs(float(selected.float().sum() / candidates.sum()) - 0.3) < 0.01
    n = float(selected.sum())
    masked = float((corrupted[selected] == 4).sum()) / n
    kept = float((corrupted[selected] == ids[selected]).sum()) / n
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1) < 0.015 and abs(1 - masked - kept - 0.1) < 0.015


def test_masked_text_rows_with_nothing_masked_are_finite():
    model = make_model()
    (obj,) = build_objectives([{"name": "masked_text", "mask_ratio": 0.5}], model.config)
    batch = random_batch(batch=4, length=8)
    batch["input_ids"][:2, 2:] = 0  # two captions of just BOS EOS: nothing to mask there
    batch["input_ids"][:2, 1] = 2
    batch["attention_mask"][:2, 2:] = 0
    out = obj(model, batch, None)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    batch["input_ids"][:, 2:], batch["input_ids"][:, 1], batch["attention_mask"][:, 2:] = 0, 2, 0  # nothing anywhere
    out = obj(model, batch, None)
    out.loss.backward()
    assert out.loss.item() == 0.0 and float(out.metrics["masked_acc"]) == 0.0
    assert masked_token_loss(torch.zeros(0, 7, requires_grad=True), torch.zeros(0, dtype=torch.long)).item() == 0.0
