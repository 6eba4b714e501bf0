"""Per-sample draws (vlpretrain/layers/draws.py) and the training draws made from them: roughly uniform, streams
and rows independent, and row b a function of seed b only, so every objective's draws on a batch split in
two halves are the whole batch's (what makes 2 processes equal 1 on the doubled batch, tests/test_fsdp.py)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_model
from tests.objectives_support import random_batch
from vlpretrain.layers import draws

SEEDS = torch.arange(2000, dtype=torch.int64) * 1_000_003 + (7 << 40)


def test_uniform_draws_are_roughly_uniform_and_independent_across_streams_rows_and_positions():
    u = draws.uniform(SEEDS, (64,), "a")  # (2000, 64)
    assert u.dtype == torch.float32 and u.shape == (2000, 64) and 0 <= float(u.min()) and float(u.max()) < 1
    n = u.numel()
    print(f"mean {u.mean():.4f}, var {u.var():.5f} (1/12 = {1 / 12:.5f})")
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=16, min=0, max=1) / n
    assert float((hist - 1 / 16).abs().max()) < 0.005

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    bound = 4 / n ** 0.5
    assert abs(corr(u, draws.uniform(SEEDS, (64,), "b"))) < bound  # another stream
    assert abs(corr(u[:-1], u[1:])) < bound  # neighbouring seeds
    assert abs(corr(u[:, :-1], u[:, 1:])) < bound  # neighbouring positions
    assert abs(corr(u, draws.uniform(SEEDS + 1, (64,), "a"))) < bound
    assert abs(corr(u, draws.uniform(SEEDS ^ (1 << 40), (64,), "a"))) < bound  # the seed's high half counts
    ints = draws.randint(SEEDS, "i", 10, len(SEEDS), (8,))
    assert ints.dtype == torch.int64 and set(ints.unique().tolist()) == set(range(10))
    forked = draws.fork(SEEDS, "f")
    assert forked.dtype == torch.int64 and len(set(forked.tolist())) == len(SEEDS) and int(forked.min()) >= 0


def test_a_row_depends_only_on_its_seed_and_the_fallback_is_torchs_generator():
    whole = draws.uniform(SEEDS[:10], (5, 3), "s")
    halves = torch.cat([draws.uniform(SEEDS[:4], (5, 3), "s"), draws.uniform(SEEDS[4:10], (5, 3), "s")])
    assert torch.equal(whole, halves) and whole.shape == (10, 5, 3)
    assert torch.equal(draws.uniform(SEEDS[:3], (7,), "s")[:, :4], draws.uniform(SEEDS[:3], (4,), "s"))  # a prefix
    scaled = draws.rand(SEEDS[:10], "s", 10, (4,), low=2.0, high=3.0)
    assert 2 <= float(scaled.min()) and float(scaled.max()) < 3
    torch.manual_seed(3)
    expected = torch.rand(4, 6)
    torch.manual_seed(3)
    assert torch.equal(draws.rand(None, "s", 4, (6,)), expected)  # bit for bit what it replaces
    torch.manual_seed(3)
    expected = torch.randint(9, (4, 6))
    torch.manual_seed(3)
    assert torch.equal(draws.randint(None, "s", 9, 4, (6,)), expected)
    with pytest.raises(ValueError, match="3 per-sample seeds for a batch of 4 rows"):
        draws.rand(SEEDS[:3], "s", 4)
    with pytest.raises(ValueError, match="int64"):
        draws.uniform(SEEDS[:3].int(), (2,), "s")


def test_the_draws_compile_to_the_same_values():
    compiled = torch.compile(lambda s: draws.uniform(s, (16,), "c"), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(SEEDS[:8]), draws.uniform(SEEDS[:8], (16,), "c"))


def _halves(batch: dict) -> list[dict]:
    return [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 3), slice(3, None))]


def test_every_objectives_draws_on_a_split_batch_are_the_whole_batchs():
    """Masks (masked_image, masked_prediction, masked_text), device-side crops, CapPa's parallel captions and
    patch dropout: with per-sample seeds each half of a batch draws what its rows drew in the whole batch
    (per-example losses then add up to the whole batch's), whatever torch's generator holds."""
    from vlpretrain.objectives.functional import mask_tokens, random_masking
    from vlpretrain.objectives.functional_teacher import random_patch_mask
    from vlpretrain.objectives.views import random_resized_crops

    seeds = SEEDS[:7]
    parts = (seeds[:3], seeds[3:])

    def split_equal(fn):
        torch.manual_seed(0)
        whole = fn(seeds)
        torch.manual_seed(1)  # another global state: it must not matter
        pieces = [fn(p) for p in parts]
        whole = whole if isinstance(whole, tuple) else (whole,)
        pieces = [p if isinstance(p, tuple) else (p,) for p in pieces]
        return all(torch.equal(w, torch.cat([a, b])) for w, a, b in zip(whole, *pieces))

    assert split_equal(lambda s: random_patch_mask(len(s), 16, 0.5, seeds=s))
    assert split_equal(lambda s: random_masking(len(s), 16, 0.75, seeds=s))
    ids = torch.randint(5, 50, (7, 12))
    rows = {len(parts[0]): ids[:3], len(parts[1]): ids[3:], 7: ids}
    assert split_equal(lambda s: mask_tokens(rows[len(s)], rows[len(s)] > 0, 0.5, 3, 50, seeds=s))
    images = torch.rand(7, 3, 32, 32)
    crops = {3: images[:3], 4: images[3:], 7: images}

    def view_major(s):  # (2 * B, ...) view-major -> (B, 2, ...) for the split comparison
        out = random_resized_crops(crops[len(s)], 2, 16, (0.1, 0.5), seeds=draws.per_view(s, 2, "v"))
        return out.view(2, len(s), *out.shape[1:]).transpose(0, 1)

    assert split_equal(view_major)
    assert not torch.equal(view_major(seeds)[:, 0], view_major(seeds)[:, 1])  # the views differ
    model = make_model(patch_dropout=0.5).train()
    assert split_equal(lambda s: model.backbone(pixel_values=crops[len(s)], layout="image", seeds=s).keep_idx)


def test_objective_set_losses_of_a_split_batch_are_the_whole_batchs(monkeypatch):
    """The SigLIP 2 objectives (teacher ones started) and masked_image with patch dropout: per-example losses
    (per-caption captioning) of the two halves, weighted by rows, equal the whole batch's; without seeds they
    do not (torch's generator draws other masks)."""
    from vlpretrain.objectives import build_objective_set

    entries = [{"name": "captioning", "per_caption": True, "parallel_prob": 0.5},
               {"name": "self_distillation", "local_crops": 2, "local_size": 16, "prototypes": 32,
                "head_hidden": 16, "head_bottleneck": 8},
               {"name": "masked_prediction", "head_hidden": 16},
               {"name": "masked_image", "decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2}]
    objectives = build_objective_set(make_model(text_embed_depth=1, patch_dropout=0.25), entries, total_steps=3)
    batch = {**random_batch(batch=6), draws.SEED_KEY: SEEDS[:6]}

    def losses(b: dict) -> dict[str, float]:
        with torch.no_grad():
            return {k: float(v) for k, v in objectives(b).losses.items()}

    objectives.train()
    whole = losses(batch)
    halves = [losses(h) for h in _halves(batch)]
    split = {k: (3 * halves[0][k] + 3 * halves[1][k]) / 6 for k in whole}
    print(f"whole {whole}\nhalves {split}")
    assert set(whole) == {"captioning", "self_distillation", "masked_prediction", "masked_image"}
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-5), key
    unseeded = {k: v for k, v in batch.items() if k != draws.SEED_KEY}
    torch.manual_seed(0)
    again = losses(unseeded)
    assert any(again[k] != pytest.approx(whole[k], rel=1e-5) for k in ("masked_prediction", "masked_image"))
