"""Every GPU check in one go (run by tools/gpu_check.sh on a borrowed GPU).

1. Every attention backend vs ``eager`` on every layout in bf16 (and fp32 in the smoke run), outputs
   and gradients.
1b. The masked ``sdpa`` op at total lengths that are and are not multiples of 8, with two aligned
   candidates (a bias with 8-aligned rows; keys padded to a multiple of 8): what cuDNN's masked forward
   costs at 197 + 64 = 261 tokens, and which candidate recovers it.
2. ``flex`` / ``flash_attn`` vs dense-mask ``sdpa`` on ``prefix_lm`` at realistic lengths: whole
   training steps and the attention op alone (forward + backward, interleaved A B A B), and how many
   graphs flex compiles for eight more text lengths.
3. A short bf16 training run of the ``base`` preset (contrastive + captioning in one pass) on
   synthetic tensors: samples/s, TFLOP/s and MFU; then under ``torch.compile`` (with a profile of
   where the GPU time goes) and under its CUDA-graph mode ``reduce-overhead``.
4. OpenCLIP's ViT-B-16 against our ``base`` preset, contrastive only, bf16, same batch of synthetic
   tensors, interleaved: samples/s and the ratio (ours / OpenCLIP), eager and both compiled (ours with
   CUDA graphs, ``train.compile_mode=reduce-overhead``; OpenCLIP's trainer offers the default mode only).

They run in the order 1, 1b, 3, 4 (compiled), 4 (eager), 2: the figures the open goals need first.

Writes one JSON object of figures to the path given (and prints it). ``--smoke`` runs the same code
on the CPU at toy sizes (seconds; its figures mean nothing): the test suite runs it so that a script
which only ever runs on a rare borrowed GPU cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlpretrain import VLConfig, VLModel  # noqa: E402
from vlpretrain.layers.attention import AttentionLayout, attend, flash_attn_available  # noqa: E402
from vlpretrain.models.presets import preset_values  # noqa: E402
from vlpretrain.objectives import build_objective_set  # noqa: E402
from vlpretrain.train.flops import FlopCounter, device_peak_flops  # noqa: E402
from vlpretrain.train.loop import compile_options  # noqa: E402

CASES = [("image", True), ("text", True), ("text", False), ("prefix_lm", True), ("fused", True),
         ("separate", True), ("separate", False)]


# sizes of the real run (GPU) and of the CPU smoke run
FULL = {"equiv_preset": "tiny", "equiv_dtypes": (torch.bfloat16,), "preset": "base", "prefix_batch": 32, "text_len": 64,
        "op_lengths": ((197, 64), (577, 128)), "op_heads": 12, "train_batch": 128, "train_steps": 30,
        "train_window": 5, "timing_steps": 10, "clip_batch": 128, "clip_rounds": 6, "clip_steps": 5,
        "align_lengths": ((197, 64), (200, 64), (197, 16), (99, 16), (104, 16)), "mfu_peak_bf16": True}
# the smoke run's MFU divides by the CPU's fp32 matmul peak: measuring its bf16 one (vlpretrain.train.flops) took
# ~18 s of the ~30 s smoke run on the 2-core CI CPU (one bf16 1024x1024 matmul: 2.2 s) for a figure that means nothing
SMOKE = {"equiv_preset": "debug", "equiv_dtypes": (torch.float32, torch.bfloat16), "preset": "debug", "prefix_batch": 2,
         "text_len": 12, "op_lengths": ((17, 12),), "op_heads": 2, "train_batch": 4, "train_steps": 7,
         "train_window": 2, "timing_steps": 1, "clip_batch": 4, "clip_rounds": 1, "clip_steps": 1,
         "align_lengths": ((17, 12),), "mfu_peak_bf16": False}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, dtype=torch.bfloat16):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _model(preset: str, device, **overrides) -> VLModel:
    return VLModel(VLConfig(**{**preset_values(preset), **overrides})).to(device)


def _pixels(model: VLModel, batch: int, device) -> torch.Tensor:
    side = model.config.image_size
    return torch.randn(batch, 3, side, side, device=device)


def text(batch, length, vocab, device):
    ids = torch.randint(5, vocab, (batch, length), device=device)
    lengths = torch.randint(length // 2, length + 1, (batch,), device=device)
    pos = torch.arange(length, device=device)[None]
    mask = (pos < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    return ids, mask


def backend_equivalence(device, size) -> dict:
    torch.manual_seed(0)
    model = _model(size["equiv_preset"], device, depth=2)
    px = _pixels(model, 4, device)
    ids, mask = text(4, min(40, model.config.max_text_len), model.config.vocab_size, device)
    out = {}
    backends = ["sdpa", "flex"] + (["flash_attn"] if flash_attn_available() else [])
    for dtype in size["equiv_dtypes"]:  # (fp32 on the GPU: all within 1.2e-4 on 2026-11-27, H200)
        for layout, causal in CASES:
            def run(backend, layout=layout, causal=causal, dtype=dtype):
                model.zero_grad(set_to_none=True)
                model.set_attn_backend(backend)
                kw = dict(layout=layout, text_causal=causal)
                with autocast(device, dtype):
                    res = model.backbone(pixel_values=None if layout == "text" else px,
                                         input_ids=None if layout == "image" else ids,
                                         attention_mask=None if layout == "image" else mask, **kw)
                parts = [t.float() for t in (res.image, res.text) if t is not None]
                valid = [torch.ones_like(parts[0][..., 0]).bool()] if res.image is not None else []
                valid += [mask.bool()] if res.text is not None else []
                sum(p[v].sum() for p, v in zip(parts, valid)).backward()
                grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
                return [p[v] for p, v in zip(parts, valid)], grads

            ref_out, ref_grads = run("eager")
            for backend in backends:
                got, grads = run(backend)
                err_out = max((a - b).abs().max().item() for a, b in zip(got, ref_out))
                err_grad = max(((grads[n] - g).abs().max() / g.abs().max().clamp(min=1)).item()
                               for n, g in ref_grads.items())
                out[f"{backend}/{layout}{'' if causal else '-bidir'}/{str(dtype)[6:]}"] = {
                    "max_abs_out": err_out, "max_rel_grad": err_grad}
    return out


def interleaved_medians(device, runs: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each callable in ``runs``: one warm-up call each (compilation), then ``rounds``
    rounds A B A B (empty when ``rounds`` is 0)."""
    def timed(fn) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    for fn in runs.values():
        timed(fn)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()} if rounds else {}


def time_prefix_lm(device, size) -> dict:
    """Whole training steps, then the attention op alone at two lengths: the first length on flex's freshly
    compiled static kernel, the second on the dynamic-shape kernel compilation switches to (what varied
    text lengths get); last, how many graphs eight more lengths cost."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _model(size["preset"], device)
    px = _pixels(model, size["prefix_batch"], device)
    ids, mask = text(size["prefix_batch"], size["text_len"], model.config.vocab_size, device)
    backends = ["sdpa", "flex"] + (["flash_attn"] if flash_attn_available() else [])

    def step(backend):
        model.set_attn_backend(backend)
        with autocast(device):
            out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()

    med = interleaved_medians(device, {b: (lambda b=b: step(b)) for b in backends}, size["timing_steps"])
    return {"step_s": med, **{f"{b}_speedup_vs_sdpa": med["sdpa"] / med[b] for b in backends if b != "sdpa"},
            "attention_only": {f"{n_img}+{n_txt}{'' if cross else ' not crossing'}": _time_attention(
                device, size, n_img, n_txt, backends, cross) for n_img, n_txt in size["op_lengths"] for cross in (True, False)},
            "flex_graphs_for_8_text_lengths": _flex_graphs_over_lengths(device, size) if device.type == "cuda" else None}


def _split_sdpa(q, k, v, layout: AttentionLayout, layer: int):
    """A candidate ``sdpa`` path, measured here before it is adopted (CPU, model step: no gain): the image
    rows over the image keys with no mask (SDPA's flash kernels), the text rows with their rows of the
    dense mask, over the text keys alone in a block where text does not read the image. Exact on every
    row; 19% fewer scores at 197 + 64 tokens when crossing, 37% when not."""
    n = layout.n_image
    image = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    mask = layout.dense_mask(layer, n, layout.n_text, q.device)  # (B or 1, 1, n_text, L)
    if layout.crosses(layer):
        text = F.scaled_dot_product_attention(q[:, :, n:], k, v, attn_mask=mask)
    else:
        text = F.scaled_dot_product_attention(q[:, :, n:], k[:, :, n:], v[:, :, n:], attn_mask=mask[..., n:])
    return torch.cat([image, text], dim=2)


def _padded_prefix_lm(device, batch: int, n_img: int, n_txt: int, cross: bool = True) -> AttentionLayout:
    """A ``prefix_lm`` layout of captions padded to ``n_txt`` (lengths drawn in [n_txt/2, n_txt]); block 0
    crosses (text reads the image) when ``cross``, else it is a block before the switch."""
    valid = torch.arange(n_txt, device=device)[None] < torch.randint(n_txt // 2, n_txt + 1, (batch, 1), device=device)
    return AttentionLayout("prefix_lm", n_img, n_txt, text_valid=valid, cross_from_layer=0 if cross else 1)


def _aligned_rows_bias(mask: torch.Tensor, dtype, multiple: int = 8) -> torch.Tensor:
    """A candidate ``sdpa`` mask: (N, 1, Lq, L) bool -> the additive ``dtype`` bias of the same values, its
    rows stored ``multiple`` elements apart (16-byte aligned in bf16; a bool mask becomes a contiguous bias
    inside SDPA, rows L apart)."""
    n, _, lq, lkv = mask.shape
    lpad = -(-lkv // multiple) * multiple
    rows = F.pad(mask[:, 0], (0, lpad - lkv), value=False)
    bias = torch.full(rows.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill(rows, 0.0)
    return bias.as_strided((n, 1, lq, lkv), (lq * lpad, 1, lpad, 1))


def _keys_padded(q, k, v, mask: torch.Tensor, multiple: int = 8):
    """A candidate ``sdpa`` path: keys and values padded with masked zeros to a multiple of ``multiple``."""
    extra = -k.shape[2] % multiple
    k, v = (F.pad(t, (0, 0, 0, extra)) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=F.pad(mask, (0, extra), value=False))


def attention_alignment(device, size) -> dict:
    """The masked ``sdpa`` op alone (bf16, B x 12 heads, padded ``prefix_lm``) at total lengths that are and
    are not multiples of 8, as called today (a bool mask) and two aligned candidates: the mask as a bias
    whose rows are stored 8-aligned, and keys padded to a multiple of 8. On the H200 (2026-11-28) cuDNN's
    masked forward took 564 us at 197 + 64 = 261 tokens but 288 us at 200 + 64 = 264 (backward 562 us both,
    the whole maskless forward 175 us): which of the two candidates recovers it decides the fix."""
    return {f"{n_img}+{n_txt}": _alignment_case(device, size, n_img, n_txt) for n_img, n_txt in size["align_lengths"]}


def _alignment_case(device, size, n_img: int, n_txt: int) -> dict:
    batch, heads, length = size["train_batch"], size["op_heads"], n_img + n_txt
    layout = _padded_prefix_lm(device, batch, n_img, n_txt)
    x = torch.randn(batch, length, 3 * heads * 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, heads, length, 64, device=device, dtype=torch.bfloat16)
    mask = layout.dense_mask(0, 0, length, device)
    bias = _aligned_rows_bias(mask, torch.bfloat16)

    def qkv():  # strided views of one projection's output, as in the model
        return x.reshape(batch, length, 3, heads, 64).permute(2, 0, 3, 1, 4).unbind(0)

    variants = {"bool_mask": lambda: attend(*qkv(), layout, 0, "sdpa"),
                "bias_aligned_rows": lambda: F.scaled_dot_product_attention(*qkv(), attn_mask=bias),
                "keys_padded": lambda: _keys_padded(*qkv(), mask)}
    with torch.no_grad():
        ref = variants["bool_mask"]().float()
        diffs = {n: (fn().float() - ref).abs().max().item() for n, fn in variants.items() if n != "bool_mask"}
    rounds = 3 * size["timing_steps"]
    fwd = interleaved_medians(device, {n: (lambda fn=fn: fn().detach()) for n, fn in variants.items()}, rounds)
    both = interleaved_medians(device, {n: (lambda fn=fn: fn().backward(grad)) for n, fn in variants.items()}, rounds)
    return {"fwd_us": {n: round(1e6 * t, 1) for n, t in fwd.items()},
            "fwd_bwd_us": {n: round(1e6 * t, 1) for n, t in both.items()}, "max_abs_diff_vs_bool_mask": diffs}


def _time_attention(device, size, n_img, n_txt, backends, cross: bool = True) -> dict:
    """The attention op alone (forward + backward, bf16) on a padded ``prefix_lm`` batch, in a block where
    text reads the image (``cross``) or one before the switch, interleaved, with the candidate
    ``sdpa_split`` (checked against ``sdpa`` here too)."""
    batch, heads = size["prefix_batch"], size["op_heads"]
    layout = _padded_prefix_lm(device, batch, n_img, n_txt, cross)
    qkv = [torch.randn(batch, heads, n_img + n_txt, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3)]
    grad = torch.randn_like(qkv[0])
    variants = {b: (lambda b=b: attend(*qkv, layout, 0, b)) for b in backends}
    variants["sdpa_split"] = lambda: _split_sdpa(*qkv, layout, 0)
    with torch.no_grad():
        split_err = (variants["sdpa_split"]().float() - variants["sdpa"]().float()).abs().max().item()
    med = interleaved_medians(device, {name: (lambda fn=fn: fn().backward(grad)) for name, fn in variants.items()},
                              3 * size["timing_steps"])
    if not med:
        return {}
    return {"ms": {name: 1e3 * t for name, t in med.items()}, "sdpa_split_max_abs_diff": split_err,
            **{f"{name}_speedup_vs_sdpa": med["sdpa"] / med[name] for name in variants if name != "sdpa"}}


def _flex_graphs_over_lengths(device, size) -> int:
    """Graphs dynamo compiles for flex over 8 new text lengths (padding to the batch's longest caption makes
    the length vary per batch): a few, not one per length, else flex falls back to its unfused path."""
    before = counters["stats"]["unique_graphs"]
    for n_txt in range(24, 64, 5):
        _time_attention(device, {**size, "timing_steps": 0}, 197, n_txt, ["sdpa", "flex"])
    return counters["stats"]["unique_graphs"] - before


def _step_timer(module, loss_fn, device):
    """A closure ``run(n)`` that runs ``n`` fused-AdamW bf16 training steps of ``module`` and returns seconds
    per step. The device is synchronised only before the first and after the last step, as in a training
    loop that reads nothing on the host in between: the host queues step i+1 while the GPU runs step i."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)

    def run(n: int = 1) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (reduce-overhead mode)
            with autocast(device):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        return (time.perf_counter() - start) / n

    return run


def train_base(device, size, flops_per_step: float | None = None, profile: bool = False,
               mode: str | None = None) -> dict:
    """bf16 contrastive + captioning steps of the preset; given the eager run's ``flops_per_step``,
    the same under ``torch.compile`` in ``mode`` (the FLOPs are counted on the eager modules only).
    ``profile`` adds where the GPU time of three more steps goes."""
    torch.manual_seed(0)
    steps, batch = size["train_steps"], size["train_batch"]
    model = _model(size["preset"], device, text_embed_depth=preset_values(size["preset"])["depth"] // 2)
    objset = build_objective_set(model, [{"name": "contrastive"}, {"name": "captioning"}]).to(device)
    counter = FlopCounter(objset) if flops_per_step is None else None
    run = objset if counter else torch.compile(objset, options=compile_options(mode or "default"))  # as the trainer
    skips_before = counters["inductor"]["cudagraph_skips"]  # graphs inductor ran without CUDA graphs
    px = _pixels(model, batch, device)
    ids, mask = text(batch, size["text_len"], model.config.vocab_size, device)
    batch_dict = {"pixel_values": px, "input_ids": ids, "attention_mask": mask}
    steps_of = _step_timer(objset, lambda: run(batch_dict).loss, device)
    for _ in range(5):  # warm-up (and compilation) left out
        steps_of(1)
    if counter:
        counter.take_flops()
    window = size["train_window"]
    times = [steps_of(window) for _ in range((steps - 5) // window)]  # seconds per step of each window
    step_flops = counter.take_flops() / (window * len(times)) if counter else flops_per_step
    mean_s = sum(times) / len(times)
    peak = device_peak_flops(device, size["mfu_peak_bf16"])
    achieved = step_flops / mean_s
    return {"compile_mode": mode, "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips_before,
            "samples_per_s": batch / mean_s, "step_s": mean_s, "flops_per_step": step_flops,
            "synced_every_steps": window,
            "tflops_per_s": achieved / 1e12, "mfu": achieved / peak if peak else None,
            "peak_tflops": peak / 1e12 if peak else None,
            "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            **({"gpu_time": _gpu_time_profile(steps_of, device)} if profile else {})}


KERNEL_KINDS = (("gemm", ("gemm", "cutlass", "nvjet", "xmma", "matmul")), ("attention", ("fmha", "attention", "flash", "flex")),
                ("fused_triton", ("triton",)), ("optimizer", ("adam", "multi_tensor")))


def _gpu_time_profile(steps_of, device, steps: int = 3) -> dict:
    """Kernel time of ``steps`` steps (``steps_of(n)``, one window) by kind (GEMM, attention, Triton-fused,
    optimiser, other), the top kernels, and the share of the span from the first kernel's start to the last
    one's end that kernels ran. (It was the share of the wall time around the profiler, its own start-up
    included: 0.70 on the H200 on 2026-11-28, which would have put the GEMMs at ~860 TFLOP/s, more than
    that GPU's GEMMs reach; at ~1.0 they ran ~600.)"""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        steps_of(steps)
    kernels: dict[str, float] = {}
    first, last = float("inf"), 0.0  # the span the kernels cover (the profiler's own start and stop left out)
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CPU:
            kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.time_range.elapsed_us()
            first, last = min(first, evt.time_range.start), max(last, evt.time_range.end)
    span_us = last - first if last > first else 1.0
    total = sum(kernels.values()) or 1.0
    kinds = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for name, us in kernels.items():
        low = name.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in low for w in words)), "other")
        kinds[kind] += us / total
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:10]
    return {"gpu_busy_frac": total / span_us, "share": kinds,
            "top_kernels": [{"name": n[:90], "share": us / total} for n, us in top]}


def _openclip_model(smoke: bool):
    """OpenCLIP's ViT-B-16, or for the smoke run a toy CLIP of the same code at the debug preset's shape."""
    import open_clip
    from open_clip.model import CLIP

    if not smoke:
        return open_clip.create_model("ViT-B-16")
    vision = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
    return CLIP(embed_dim=64, vision_cfg=vision, text_cfg={"context_length": 77, "width": 64, "heads": 2, "layers": 2})


def openclip_ratio(device, size, compiled: bool = False, ours_mode: str | None = None) -> dict:
    """Our preset (contrastive) vs OpenCLIP ViT-B-16 (CLIP loss), interleaved A B A B; ``compiled``: each
    side under ``torch.compile``, ours in ``ours_mode`` (``train.compile_mode``; OpenCLIP's trainer has
    ``--torchcompile``, the default mode, only)."""
    import open_clip

    torch.manual_seed(0)
    smoke = size is SMOKE
    ours = build_objective_set(_model(size["preset"], device), [{"name": "contrastive"}]).to(device)
    theirs = _openclip_model(smoke).to(device)
    run_ours, run_theirs = ((torch.compile(ours, options=compile_options(ours_mode or "default")), torch.compile(theirs))
                            if compiled else (ours, theirs))
    clip_loss = open_clip.ClipLoss()
    n, length = size["clip_batch"], size["text_len"]
    px = _pixels(ours.model, n, device)
    ids, mask = text(n, length, 49408, device)
    eot = mask.sum(1) - 1
    oc_ids = torch.zeros(n, 77, dtype=torch.long, device=device)
    oc_ids[:, :length] = ids
    oc_ids[torch.arange(n, device=device), eot] = 49407  # OpenCLIP pools at the largest id (EOT)
    ids = ids.clamp(max=ours.model.config.vocab_size - 1)

    def their_loss():
        img, txt, scale = run_theirs(px, oc_ids)[:3]
        return clip_loss(img, txt, scale)

    batch = {"pixel_values": px, "input_ids": ids, "attention_mask": mask}
    steppers = {"vlpretrain": _step_timer(ours, lambda: run_ours(batch).loss, device),
                "openclip": _step_timer(theirs, their_loss, device)}
    for steps_of in steppers.values():  # warm-up (and compilation)
        steps_of(3)
    times = {k: [] for k in steppers}
    for _ in range(size["clip_rounds"]):  # A B A B, each a window of clip_steps steps
        for name, steps_of in steppers.items():
            times[name].append(steps_of(size["clip_steps"]))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"batch": n, "compiled": compiled, "ours_mode": ours_mode, "samples_per_s": {k: n / v for k, v in med.items()},
            "ratio_vs_openclip": med["openclip"] / med["vlpretrain"],
            "note": "ours: shared 768-wide backbone, text 64 tokens; OpenCLIP: ViT-B/16 + 512-wide text tower, 77 tokens"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks the script runs, not the GPU")
    parser.add_argument("--only", action="append", default=[], metavar="SECTION", help="run this section (repeatable)")
    parser.add_argument("--skip", action="append", default=[], metavar="SECTION", help="leave this section out (repeatable)")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    figures = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0), "torch": torch.__version__,
               "flash_attn": flash_attn_available()}
    def compiled_base(mode):  # the FLOPs of the eager run (the counter sees no compiled kernels)
        return lambda device, size: train_base(device, size, figures["train_base_bf16"]["flops_per_step"],
                                               mode=mode, profile=True)

    # the most wanted first: a time-out keeps every section before it (the file is rewritten after each)
    sections = [("equivalence", backend_equivalence), ("attention_alignment", attention_alignment),
                ("train_base_bf16", train_base)]
    if not args.smoke:  # compiling the base model takes the longest (a minute or more each)
        # (flex under compile measured 0.58x of sdpa on 2026-11-27, H200: cuDNN serves the dense mask;
        # the same-mode compiled ratio vs OpenCLIP 1.09x, eager 0.99x)
        sections += [("train_base_bf16_cudagraphs", compiled_base("reduce-overhead")),
                     ("train_base_bf16_compiled", compiled_base(None)),
                     ("openclip_vit_b16_compiled", lambda device, size: openclip_ratio(
                         device, size, compiled=True, ours_mode="reduce-overhead"))]
    sections += [("openclip_vit_b16", openclip_ratio), ("prefix_lm_timing", time_prefix_lm)]
    unknown = sorted(set(args.only + args.skip) - {name for name, _ in sections})
    if unknown:
        parser.error(f"unknown section(s) {unknown}; valid: {', '.join(name for name, _ in sections)}")
    sections = [(n, fn) for n, fn in sections if (not args.only or n in args.only) and n not in args.skip]
    for name, fn in sections:
        try:
            figures[name] = fn(device, size)
        except Exception as exc:  # keep the other figures
            figures[name] = {"error": f"{type(exc).__name__}: {exc}"}
        args.out.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
