"""MFU's numerator: FLOPs counted from the shapes that ran, once per forward, never for recompute."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_model, make_text
from vlpretrain.objectives import build_objective_set
from vlpretrain.train.flops import FlopCounter, flop_rates, gpu_peak_flops, measured_cpu_peak


def analytic_forward_flops(cfg, batch: int, n_image: int, n_text: int) -> float:
    """Matmul FLOPs of one prefix-LM forward + lm_head, written out from the architecture."""
    D, H, L = cfg.width, int(cfg.width * cfg.mlp_ratio), n_image + n_text
    per_token_block = 2 * (D * 3 * D + D * D + D * H + H * D)  # qkv, proj, fc1, fc2
    attention = 4 * L * L * D  # scores and weighted sum, per sequence and block
    patches = (n_image - 1) * 2 * cfg.in_chans * cfg.patch_size**2 * D
    lm_head = n_text * 2 * D * cfg.vocab_size
    return batch * (cfg.depth * (L * per_token_block + attention) + patches + lm_head)


def test_counted_flops_match_the_architecture_and_skip_recompute_and_no_grad():
    model = make_model("debug")
    counter = FlopCounter(model)
    px = torch.randn(3, 3, 32, 32)
    ids, mask = make_text(3, 9)
    out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids)
    want = analytic_forward_flops(model.config, 3, 17, 9)
    assert counter.forward_flops == want
    out.loss.backward()
    assert counter.take_flops() == 3 * want  # forward + backward, and reset
    model.set_grad_checkpointing(True)  # recompute in backward is not model FLOPs
    model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert counter.take_flops() == 3 * want
    with torch.no_grad():
        model(pixel_values=px, input_ids=ids, attention_mask=mask)
    assert counter.take_flops() == 0
    counter.remove()
    model(pixel_values=px, input_ids=ids, attention_mask=mask)
    assert counter.forward_flops == 0


def test_the_teacher_forward_counts_once_from_its_start():
    # the EMA teacher runs under no_grad (no graph, no backward): a counter naming it forward_only adds its
    # forward FLOPs once; before, they were missed and MFU dropped when the teacher started
    from torch.utils.flop_counter import FlopCounterMode

    entries = [{"name": "contrastive"}, {"name": "masked_prediction", "head_hidden": 32, "start": 1}]
    objectives = build_objective_set(make_model("debug", text_embed_depth=1), entries, total_steps=4)
    with_teacher = FlopCounter(objectives, forward_only=[objectives.teacher])
    graph_only = FlopCounter(objectives)  # the graph-building forwards x 3 alone
    ids, mask = make_text(4, 9)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "input_ids": ids, "attention_mask": mask}
    objectives(batch).loss.backward()  # step 0: the teacher has not started
    before = graph_only.take_flops()
    assert with_teacher.take_flops() == before > 0
    objectives.set_step(1)
    objectives(batch).loss.backward()
    without, got = graph_only.take_flops(), with_teacher.take_flops()
    # torch's own count of the teacher's forward, with eager attention (its counter misses the CPU SDPA kernel)
    objectives.teacher.backbone.set_attn_backend("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as teacher_alone:
        objectives.teacher.backbone(pixel_values=batch["pixel_values"], layout="image")
    teacher = teacher_alone.get_total_flops()
    print(f"per sample: step 0 {before / 4:.4g}, step 1 without the teacher {without / 4:.4g}, with it "
          f"{got / 4:.4g}; the teacher's forward {teacher / 4:.4g} (FlopCounterMode)")
    assert without > before and teacher > 0
    assert got == without + teacher
    with_teacher.remove()
    graph_only.remove()


def test_cpu_peak_is_measured_without_touching_the_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert measured_cpu_peak(torch.float32, seconds=0.05) > 1e9
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 67e12), ("NVIDIA H100 PCIe", 756e12, 51e12), ("NVIDIA H100 NVL", 835e12, 60e12),
    ("NVIDIA H200", 989e12, 67e12), ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12), ("NVIDIA A100 80GB PCIe", 312e12, 19.5e12),
    ("NVIDIA L4", 121e12, 30.3e12), ("NVIDIA L40", 181e12, 90.5e12), ("NVIDIA L40S", 362e12, 91.6e12),
    ("NVIDIA A10G", 125e12, 31.2e12), ("NVIDIA GeForce RTX 4090", 165e12, 82.6e12),
    ("Tesla V100-SXM2-16GB", 125e12, 15.7e12), ("Tesla V100-PCIE-32GB", 112e12, 14e12),
])
def test_gpu_peaks_match_whole_model_names(name, bf16, fp32):
    assert (gpu_peak_flops(name, True), gpu_peak_flops(name, False)) == (bf16, fp32)


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4080", "NVIDIA B200", "NVIDIA A1000", "NVIDIA L400"])
def test_unknown_gpus_get_no_peak(name):
    assert gpu_peak_flops(name, True) is None


def test_mfu_is_left_out_without_a_peak_or_above_one():
    assert flop_rates(4e12, 2.0, 4e12) == {"tflops_per_s": 2.0, "mfu": 0.5}
    assert flop_rates(4e12, 2.0, None) == {"tflops_per_s": 2.0}
    assert flop_rates(4e12, 2.0, 1e12) == {"tflops_per_s": 2.0}  # the work outran the (measured) peak
