"""The run's plots: eval.png has one panel per family of figures, and no count on a metric's axis."""

from __future__ import annotations

import json

from vlpretrain.train.metrics import eval_family, eval_figure, plot_curves


def _records() -> list[dict]:
    """metrics.jsonl as a demo run writes it: training lines, and eval lines every few steps."""
    records = []
    for step in range(1, 7):
        records.append({"step": step, "loss": 5.0 - 0.3 * step, "loss/contrastive": 2.0 - 0.1 * step, "lr": 1e-3})
        if step % 3 == 0:
            records.append({"step": step, "eval/samples": 500, "eval/i2t_r@1": 0.1 * step, "eval/t2i_r@5": 0.12 * step,
                            "eval/caption_loss": 4.0 - 0.2 * step, "eval/caption_token_acc": 0.05 * step,
                            "eval/captions": [{"generated": "a", "reference": "b"}]})
    return records


def _lines(ax) -> set[str]:
    return {line.get_label() for line in ax.get_lines()}


def test_eval_figure_has_a_panel_per_family_and_keeps_counts_off_the_axes():
    fig = eval_figure(_records())
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {"retrieval (recall@k)", "captions", "losses"}
    assert _lines(panels["retrieval (recall@k)"]) == {"eval/i2t_r@1", "eval/t2i_r@5"}
    assert _lines(panels["captions"]) == {"eval/caption_token_acc"}
    assert _lines(panels["losses"]) == {"eval/caption_loss"}
    assert panels["retrieval (recall@k)"].get_ylim()[1] < 1.0  # not stretched to a count of 500
    assert "samples 500" in fig._suptitle.get_text()


def test_families_of_known_and_unknown_figures():
    assert [eval_family(k) for k in ("i2t_r@1", "top5", "bleu4", "cider", "caption_loss", "samples", "mystery")] == [
        "retrieval (recall@k)", "retrieval (recall@k)", "captions", "captions", "losses", None, "other"]


def test_plot_curves_writes_both_pngs(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    assert [p.name for p in plot_curves(tmp_path)] == ["loss.png", "eval.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in ("loss.png", "eval.png"))
