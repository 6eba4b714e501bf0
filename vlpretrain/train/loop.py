"""The training loop under HuggingFace Accelerate: one CPU to many GPUs, DDP or FSDP from its config.

``train(cfg)`` checks everything it can before the first step (config, shards, batch split,
resume compatibility) and writes nothing into ``run.dir`` until those checks pass. Then it runs
``train.steps`` optimiser steps, each over ``train.batch_size`` samples split across processes and
``train.accum_steps`` micro-batches (exact for contrastive losses), logging, evaluating and
checkpointing as configured; SIGTERM/SIGINT finish the step, save and exit cleanly.

The run is a :class:`Trainer` whose methods follow it in order: the set-up checks, the training parts,
the run folder opened, one step, one log window, evaluation/checkpoint, and the summary.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vlpretrain.config import CUDA_GRAPH_MODES, ConfigError, ExperimentConfig, to_yaml
from vlpretrain.data.processor import VLProcessor
from vlpretrain.data.shards import ShardStream
from vlpretrain.data.bootstrap import ensure_synthetic
from vlpretrain.data.device_decode import DeviceBatches
from vlpretrain.layers.draws import SEED_KEY
from vlpretrain.finetune import FREEZE
from vlpretrain.models.from_timm import describe_load, load_timm_image_path, timm_image_tower
from vlpretrain.models.modeling import VLConfig, VLModel
from vlpretrain.objectives import build_objective_set
from vlpretrain.objectives.schedule import check_starts
from vlpretrain.train.accumulate import accumulate_backward, backward
from vlpretrain.train.checkpoint import (
    Trainables, check_data_position, complete_checkpoints, load_checkpoint, resolve_resume, resumed_step,
    save_checkpoint)
from vlpretrain.train.integrity import check_resume, check_run_processor, run_tokenizer, save_run_processor
from vlpretrain.train.flops import FlopCounter, device_peak_flops, flop_rates
from vlpretrain.train.host_reads import LaggedReadback, step_unless
from vlpretrain.train.precision import emulates, emulation_for, emulation_note, low_precision_context
from vlpretrain.train.metrics import MetricsLog, logged_eval, plot_curves
from vlpretrain.train.model_init import _load_init_from, _model_from_pretrained, _tokenizer_into_model_config
from vlpretrain.train.optim import add_started_groups, build_optimizer, build_scheduler
from vlpretrain.train.stream_views import StreamViews
from vlpretrain.train.run_outputs import _evaluate, _export, _full_model, _write_json  # _full_model: imported from here too
from vlpretrain.train import sharding
from vlpretrain.train.unused import ddp_record, decide_ddp
from vlpretrain.train.window import WindowMeans, step_values


class TrainingStopped(RuntimeError):
    """Training stopped itself (e.g. too many non-finite losses in a row); a checkpoint was saved."""


@dataclass
class _State:
    """What the loop carries between steps; saved as trainer_state.json."""

    step: int = 0
    samples_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    epoch: int = 0
    dropped_tail: int = 0
    eval: dict[str, Any] = field(default_factory=dict)


def _micro_batch_size(cfg: ExperimentConfig, world: int) -> int:
    t = cfg.train
    if t.batch_size % (world * t.accum_steps):
        raise ConfigError(f"train.batch_size: {t.batch_size} does not split across {world} process(es) x "
                          f"train.accum_steps={t.accum_steps} micro-batches; use a multiple of {world * t.accum_steps}.")
    return t.batch_size // (world * t.accum_steps)


def _check_fresh_run_dir(run_dir: Path, resume: Path | None) -> None:
    if resume is None and complete_checkpoints(run_dir):
        raise ConfigError(f"run.dir '{run_dir}' already holds checkpoints; continue it with train.resume=auto "
                          f"(or --resume auto), or choose a new run.dir. Nothing was overwritten.")


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 0."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _next_batch(stream: ShardStream, it, state: _State, size: int):
    """The next full batch of ``size``, starting the next epoch when this one is done (epoch mode).

    An epoch's ragged last batch is dropped (and counted): every rank must hold the same number of
    examples for the contrastive all-gather, and each step the same number of samples.
    """
    full_epoch_without_batch = False
    while True:
        try:
            batch = next(it)
        except StopIteration:
            if full_epoch_without_batch:
                raise ConfigError(f"a whole epoch of data.train gave this rank no batch of {size} samples: each "
                                  f"dataloader worker holds fewer samples than one micro-batch. Use fewer "
                                  f"data.num_workers, a smaller train.batch_size, more data, or data.mode=resampled.") from None
            full_epoch_without_batch = True
            state.epoch = stream.epoch
            it = iter(stream)
            continue
        if len(batch["pixel_values"]) == size:
            return batch, it
        state.dropped_tail += len(batch["pixel_values"])


def _tokens(batch: dict, image_tokens: int) -> float:
    """Input tokens of a (host) batch: ``image_tokens`` per image plus the real caption tokens."""
    mask = batch.get("attention_mask")
    return len(batch["pixel_values"]) * image_tokens + (float(mask.sum()) if mask is not None else 0.0)


def _to_device(batch: dict, device, normalize=None, compiled: bool = False) -> dict:
    """The model inputs of a host batch on ``device``. ``normalize`` (the stream's, for its uint8 pixels)
    makes the pixels floats there: copying uint8 moves a quarter of the bytes. ``compiled``: the text
    length (each batch's longest caption) is marked dynamic, so torch.compile builds one graph for all
    lengths from the first batch on (without the mark: a static graph first, then a dynamic one per call
    variant, and accumulation's three variants exceed dynamo's limit of 8 graphs, after which it runs eager)."""
    keys = ("pixel_values", "input_ids", "attention_mask", SEED_KEY)  # SEED_KEY: per-sample draws (layers/draws.py)
    out = {k: batch[k].to(device, non_blocking=True) for k in keys if batch.get(k) is not None}
    if batch.get("views"):  # the objectives' extra views, {name: (B, count, 3, s, s)}
        out["views"] = {k: v.to(device, non_blocking=True) for k, v in batch["views"].items()}
    if normalize is not None and "pixel_values" in out:
        out["pixel_values"] = normalize(out["pixel_values"])
    if normalize is not None and "views" in out:
        out["views"] = {k: normalize(v) for k, v in out["views"].items()}
    if compiled:
        for key in ("input_ids", "attention_mask"):
            if key in out:
                torch._dynamo.mark_dynamic(out[key], 1)
    return out


def compile_options(mode: str) -> dict:
    """torch.compile's inductor options for ``train.compile_mode`` (the mode's own, as ``mode=`` would set).
    Before torch 2.14, mix-order reduction (a layer norm backward's row and column reductions in one
    kernel) is off: with a dynamic caption length, torch 2.11's inductor emitted the workspace slice
    ``ws[i * n + 8*s * 768 : ...]`` without brackets around the split count, and the first CUDA backward
    failed ("shape '[920, 768]' is invalid for input of size 792"; H200, 2026-11-28). 2.14 brackets it."""
    from torch._inductor import config as inductor_config, list_mode_options  # heavy: only when compiling

    options = dict(list_mode_options(mode))
    if torch.__version__ < (2, 14) and hasattr(inductor_config.triton, "mix_order_reduction"):
        options["triton.mix_order_reduction"] = False
    return options


def _cuda_graph_note(mode: str, device: torch.device, pad_multiple: int) -> str:
    """What a run under a CUDA-graph compile mode prints before its first step."""
    if device.type != "cuda":
        return f"train.compile_mode={mode}: CUDA graphs apply on CUDA devices only; on {device.type} it compiles without them"
    note = f"train.compile_mode={mode}: each step replays CUDA graphs (recorded on the first steps of each shape)"
    if pad_multiple == 1:
        note += ("; captions are padded to each batch's longest, so every new caption length records another "
                 "graph: data.pad_multiple=8 bounds them to context/8")
    return note


DATA_BOUND_WAIT = 0.5  # a log window whose steps waited this share of their time on data gets the note below


def _data_bound_note(step: int, wait_frac: float, num_workers: int) -> str:
    """What the trainer prints (once) when a log window after the first waited on data for more than
    DATA_BOUND_WAIT of its time: on a GPU the step is then bound by the data workers, not the model."""
    return (f"[step {step}] the model waited on data {wait_frac:.0%} of the last log window: the data workers "
            f"(data.num_workers={num_workers}, on {os.cpu_count()} CPUs) do not keep up. More workers, "
            f"data.worker_priority=normal (they run at idle priority by default), data.decode=device (JPEGs decoded "
            f"on the trainer's GPU), or images stored at training size (vlpretrain make-shards --resize 256) feed it "
            f"faster; tools/bench_data.py --stages measures each stage of the pipeline alone")


class Trainer:
    """One run of ``cfg``, in the order :meth:`run` calls its parts: the set-up checks (nothing is written
    into ``run.dir`` until they pass), the training parts, the run folder opened (the first writes; a
    resume's state loaded), then each step with its log window, evaluation and checkpoint, and the summary."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg, self.t, self.run_dir = cfg, cfg.train, Path(cfg.run.dir)

    def run(self) -> dict[str, Any]:
        """Train; returns the summary also written to ``run.dir/summary.json``."""
        self._check_setup()
        self._build_parts()
        self._open_run()
        self._start_loop()
        with _StopSignal() as self.stop:
            while self.state.step < self.t.steps:
                if self._after_step(*self._step()):
                    break
        return self._finish()

    # ---- set-up: every check before the first write into run.dir

    def _check_setup(self) -> None:
        """The launch, the batch split, the objectives' starts, resume and data position, the tokenizer, the
        model, the objectives and the processor: all checked before anything is written."""
        cfg, t, run_dir = self.cfg, self.t, self.run_dir
        self.fsdp = sharding.fsdp_from_launcher(t.precision)  # before the Accelerator: FSDP2 is applied here, on every device
        self.accelerator = accelerator = Accelerator(
            mixed_precision=t.precision, log_with=t.trackers or None, project_dir=str(run_dir),
            step_scheduler_with_optimizer=False)  # DDP's kwargs: decide_ddp, once the objectives exist
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        sharding.check_world(accelerator)
        if emulates(accelerator.device, t.precision):
            accelerator.print(emulation_note(t.precision))
        self.micro = _micro_batch_size(cfg, self.world)
        check_starts(cfg.objectives, t.steps)
        self.resume = resume = resolve_resume(t.resume, run_dir)
        _check_fresh_run_dir(run_dir, resume)
        if accelerator.is_main_process:
            ensure_synthetic(cfg.data, cfg.model.image_size, cfg.run.seed)
        accelerator.wait_for_everyone()
        pretrained = _load_init_from(t.init_from)
        tokenizer = run_tokenizer(cfg, resume, pretrained, accelerator.print)  # the model's own on resume/init_from
        self.model = self._build_model(pretrained, tokenizer)
        del pretrained  # its weights are copied: no second model held through the run
        self._build_objectives(tokenizer)
        # the objectives' extra views, cut by the data workers from their objectives' start (train/stream_views.py)
        self.views = StreamViews(self.objectives, functools.partial(
            ShardStream, cfg.data, "train", batch_size=self.micro, image_size=cfg.model.image_size,
            context_length=cfg.model.max_text_len, tokenizer=tokenizer, rank=self.rank, world_size=self.world,
            seed=cfg.run.seed, pin_memory=accelerator.device.type == "cuda",
            normalize=False), accelerator.print)  # uint8 to the device, normalised there (_to_device)
        self.stream = self.views.stream_at(resumed_step(resume) if resume is not None else 0)
        if note := self.views.note(self.stream):
            accelerator.print(note)
        if resume is not None:
            check_data_position(resume, self.stream)

    def _build_model(self, pretrained, tokenizer) -> VLModel:
        """The run's model, seeded: ``train.init_from``'s (``pretrained``), a timm ViT's image path, or fresh."""
        cfg, t = self.cfg, self.t
        set_seed(cfg.run.seed)
        if pretrained is not None:
            return _model_from_pretrained(cfg, pretrained, tokenizer)
        vit = timm_image_tower(cfg.model, t.init_from)  # timm:NAME: the trunk's shape is the timm ViT's
        _tokenizer_into_model_config(cfg, tokenizer)
        model = VLModel(VLConfig.from_model_config(cfg.model))
        if vit is not None:
            self.accelerator.print(describe_load(load_timm_image_path(model, vit, t.init_from), t.init_from))
        return model

    def _build_objectives(self, tokenizer) -> None:
        """The model's training settings, the objectives and the processor; then the resume and processor checks."""
        cfg, t, model, accelerator = self.cfg, self.t, self.model, self.accelerator
        model.set_grad_checkpointing(t.grad_checkpointing)
        model.backbone.set_low_precision_emulation(emulation_for(accelerator.device, t.precision))
        if t.freeze:
            accelerator.print(f"train.freeze={t.freeze}: {len(FREEZE[t.freeze](model))} parameter tensors frozen")
        self.objectives = build_objective_set(model, cfg.objectives, t.steps, cfg.teacher)
        self.processor = VLProcessor.from_data_config(cfg.data, cfg.model.image_size, cfg.model.max_text_len, tokenizer)
        check_resume(self.resume, cfg, self.objectives)  # every resume check before the first write into run.dir
        check_run_processor(self.run_dir, self.resume, self.processor)

    # ---- the training parts and the run folder

    def _build_parts(self) -> None:
        """DDP's settings or FSDP2 sharding, the optimiser and scheduler (prepared), torch.compile; then the
        per-rank seed."""
        cfg, t, accelerator, objectives, fsdp = self.cfg, self.t, self.accelerator, self.objectives, self.fsdp
        first_step = resumed_step(self.resume) if self.resume is not None else 0  # the optimiser holds what trains from it
        objectives.set_step(first_step)
        self.unused = None
        if fsdp is None:
            self.unused = decide_ddp(accelerator, objectives)  # before prepare: it sets the DDP kwargs prepare uses
        else:  # sharded here, not by accelerate (sharding.py says why), before the optimiser takes the DTensors
            module = sharding.shard(objectives, accelerator.device, fsdp)
        optimizer = build_optimizer(objectives, cfg.optim, accelerator.device, start_step=first_step)
        scheduler = build_scheduler(optimizer, cfg.optim, t.steps)
        if fsdp is None:
            module, optimizer, scheduler = accelerator.prepare(objectives, optimizer, scheduler)
        else:
            optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.trainables = Trainables(objectives, optimizer, scheduler, sharded=fsdp is not None)
        self.cuda_graphs = t.compile and t.compile_mode in CUDA_GRAPH_MODES
        if t.compile:
            module = torch.compile(module, options=compile_options(t.compile_mode))
            if self.cuda_graphs:
                accelerator.print(_cuda_graph_note(t.compile_mode, accelerator.device, cfg.data.pad_multiple))
        self.module = module
        set_seed(cfg.run.seed + self.rank)  # torch's generator per rank: draws of batches without sample_seed

    def _open_run(self) -> None:
        """The first writes into run.dir (config, processor, trackers), then a resume's state and data position."""
        cfg, t, accelerator, run_dir = self.cfg, self.t, self.accelerator, self.run_dir
        self.counter = FlopCounter(self.objectives, forward_only=[self.objectives.teacher])  # the teacher: 1x, no backward
        native_low_precision = t.precision in ("bf16", "fp16") and not emulates(accelerator.device, t.precision)
        self.peak = device_peak_flops(accelerator.device, native_low_precision)  # emulated low precision runs fp32 GEMMs
        self.config_yaml = to_yaml(cfg)
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(self.config_yaml)
            save_run_processor(run_dir, self.processor)  # what every checkpoint's manifest points to
        accelerator.init_trackers(run_dir.name, config=_flat(cfg), init_kwargs=_tracker_kwargs(t.trackers, run_dir))
        self.state = _State()
        if self.resume is not None:  # last before the loop: it restores the RNG states the next step draws from
            saved, data_position = load_checkpoint(accelerator, self.resume, self.trainables)
            self.state = _State(**saved)
            if data_position is not None:
                how = self.stream.load_position(data_position)
                accelerator.print(f"data position of {self.resume.name}: {how} ({self.world} process(es))")
        self.log = MetricsLog(run_dir, accelerator, resume_step=self.state.step if self.resume is not None else None)

    def _checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.run_dir, self.state.step, vars(self.state), self.stream,
                               self.config_yaml, self.t.keep_last, self.trainables)

    def _start_loop(self) -> None:
        """What the loop carries besides the state: timers, progress bar, data iterator, log window, flags."""
        state = self.state
        self.start, self.samples_at_start, self.step_at_start = time.perf_counter(), state.samples_seen, state.step
        self.progress = _progress(self.accelerator, state.step, self.t.steps)
        self.it = iter(self.stream)
        self.decoded = DeviceBatches(self.stream, self.accelerator.device)  # data.decode=device: JPEGs decoded there (else as is)
        self.new_window = {"time": 0.0, "wait": 0.0, "samples": 0, "tokens": 0.0, "steps": 0}
        self.window = dict(self.new_window)
        self.means = WindowMeans()  # the window's mean losses and metrics, summed on the device
        self.image_tokens = 1 + self.model.backbone.num_patches  # per image: cls + patches (before any patch dropout)
        self.stopped_by, self.final = None, self.resume  # a run resumed at its last step has nothing new to save
        self.flags = _StepFlags(state, self.t.max_nonfinite)
        self.data_bound_noted = False

    # ---- one step

    def _step(self) -> tuple[bool, torch.Tensor]:
        """One optimiser step; returns whether a rank asked to stop (as read back) and the gradient norm (on the
        device). After train.max_nonfinite non-finite steps in a row: a checkpoint, then TrainingStopped."""
        t, state = self.t, self.state
        step_start = time.perf_counter()
        batches, tokens = self._next_batches()
        wait = time.perf_counter() - step_start
        out = self._forward_backward(batches)
        grad_norm, summed, bad = self._optimizer_step(out)
        state.step += 1
        n_samples = self.micro * len(batches) * self.world  # every micro-batch is full (_next_batch)
        state.samples_seen += n_samples
        # the step's flags are read one step late, except where the host reads anyway (log, eval,
        # checkpoint, last step) and during a run of non-finite steps (so the limit is hit exactly)
        sync_now = (state.step % t.log_every == 0 or state.step == t.steps or state.nonfinite_run > 0
                    or _every(self.cfg.eval.every, state.step) or _every(t.ckpt_every, state.step))
        stop_now, diverged = self.flags.after_step(torch.cat([summed[1:], bad.float()]), sync_now)
        step_time = time.perf_counter() - step_start
        window = self.window
        window["time"] += step_time
        window["wait"] += wait
        window["samples"] += n_samples
        window["tokens"] += tokens
        window["steps"] += 1
        if diverged:
            path = self._checkpoint()
            raise TrainingStopped(f"the loss or gradient was non-finite in {diverged} steps in a row "
                                  f"(train.max_nonfinite={t.max_nonfinite}); the last good weights are saved in "
                                  f"{path}. Lower optim.lr, raise optim.warmup_steps or check the data.")
        return stop_now, grad_norm

    def _next_batches(self) -> tuple[list[dict], float]:
        """train.accum_steps full micro-batches on the device, and their input tokens (counted on the host)."""
        batches, tokens = [], 0.0
        self.stream, self.it = self.views.at_step(self.stream, self.it, self.state.step)  # views from their start
        for _ in range(self.t.accum_steps):
            raw, self.it = _next_batch(self.stream, self.it, self.state, self.micro)
            tokens += _tokens(raw, self.image_tokens)  # counted on the host batch: no device sync
            batches.append(_to_device(self.decoded(raw), self.accelerator.device, self.stream.normalize,
                                      compiled=self.t.compile))
            for reason, n in raw.get("skipped", {}).items():
                self.window[f"skipped/{reason}"] = self.window.get(f"skipped/{reason}", 0) + n
        return batches, tokens

    def _forward_backward(self, batches: list[dict]):
        """The objectives at this step (those starting now join the optimiser), forward and backward."""
        t, accelerator, module, state = self.t, self.accelerator, self.module, self.state
        self.objectives.set_step(state.step)  # objectives starting now join the optimiser (objectives/schedule.py)
        add_started_groups(self.optimizer, self.scheduler, self.objectives.parts_starting_at(state.step), self.cfg.optim)
        module.train()
        if self.cuda_graphs:  # a new iteration: the previous step's graph outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        with low_precision_context(accelerator, t.precision):
            if t.accum_steps == 1:
                out = module(batches[0])
                backward(out.loss, accelerator)
            else:
                out = accumulate_backward(module, batches, accelerator)
        return out

    def _optimizer_step(self, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clip, the step's one reduce, the optimiser step (skipped on the device when non-finite) and the
        after-step hooks. Returns the gradient norm, the summed (loss, stop requests) and the non-finite flag,
        all on the device."""
        accelerator, optimizer, stop = self.accelerator, self.optimizer, self.stop
        grad_norm = torch.as_tensor(  # always computed (max_norm=inf clips nothing): it also detects non-finite gradients
            accelerator.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip or float("inf")),
            device=accelerator.device).float().reshape(1)
        # one reduce per step, read by nobody now: the summed loss, and whether any rank got SIGTERM/SIGINT
        loss = out.loss.detach().float().reshape(1)
        summed = accelerator.reduce(torch.cat([loss, torch.full_like(loss, float(stop.received is not None))]),
                                    "sum")
        bad = ~torch.isfinite(summed[:1])
        if accelerator.scaler is not None:
            # fp16: the grad scaler skips steps with inf/nan gradients itself and lowers its scale;
            # it must see every step, so only a non-finite loss counts against the run
            optimizer.step()
        else:
            bad = bad | ~torch.isfinite(grad_norm)
            step_unless(optimizer, bad)  # skipped on the device: no host read of the loss here
        self.means.add(step_values(out), bad)  # non-finite steps are left out of the window's means
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.objectives.after_optimizer_step()  # on the real (sharded) parameters: temperature clamp, EMA teacher
        return grad_norm, summed, bad

    # ---- after each step: log window, evaluation, stop, checkpoint

    def _after_step(self, stop_now: bool, grad_norm: torch.Tensor) -> bool:
        """The log window, evaluation and checkpoint due at this step; True when the run stops here."""
        cfg, t, state = self.cfg, self.t, self.state
        if state.step % t.log_every == 0 or state.step == t.steps:
            self._log_window(grad_norm)
        self.progress.update(1)
        if _every(cfg.eval.every, state.step) and state.step < t.steps:
            state.eval = _evaluate(cfg, self.accelerator, self.module, self.processor, self.log, state.step)
        if stop_now:
            received = self.stop.received
            self.stopped_by = signal.Signals(received).name if received is not None else "SIGTERM"
            return True
        if _every(t.ckpt_every, state.step):
            self.final = self._checkpoint()
        return False

    def _log_window(self, grad_norm: torch.Tensor) -> None:
        """The record of the log window ending at this step (means, rates, FLOP rates), logged; the data-bound
        note (once); a new window."""
        accelerator, state, window = self.accelerator, self.state, self.window
        window_means = self.means.take(accelerator)  # the one reduce and read of the window's means
        loss_value = window_means["loss"]
        all_tokens = float(accelerator.reduce(torch.tensor([window["tokens"]], device=accelerator.device), "sum"))
        record = {"samples_seen": state.samples_seen, "epoch": state.epoch, **window_means,
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "samples_per_s": window["samples"] / window["time"],
                  "tokens_per_s": all_tokens / window["time"], "step_time_s": window["time"] / window["steps"],
                  "data_wait_frac": window["wait"] / window["time"], "nonfinite_steps": state.nonfinite_total,
                  **{k: v for k, v in window.items() if k.startswith("skipped/")}}
        flops = self.counter.take_flops()  # the window's steps (read here: under compile, a device value)
        record.update(flop_rates(flops, window["time"], self.peak))
        self.log.log(state.step, record)
        if (not self.data_bound_noted and state.step - self.step_at_start > self.t.log_every  # the first holds the workers' start
                and record["data_wait_frac"] > DATA_BOUND_WAIT):
            accelerator.print(_data_bound_note(state.step, record["data_wait_frac"], self.stream.num_workers))
            self.data_bound_noted = True
        self.progress.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{record['samples_per_s']:.1f}")
        self.window = dict(self.new_window)

    # ---- the end: last checkpoint and evaluation, export, summary

    def _finish(self) -> dict[str, Any]:
        """The last checkpoint and evaluation, the summary, the export and the plots; returns the summary."""
        cfg, accelerator, state, resume = self.cfg, self.accelerator, self.state, self.resume
        self.progress.close()
        self.counter.remove()
        if self.final is None or self.final.name != f"step_{state.step}":
            self.final = self._checkpoint()
        wall = time.perf_counter() - self.start
        if self.stopped_by is None:  # (a finished run resumed trains nothing: its last evaluation stands, logged once)
            logged = logged_eval(self.run_dir, state.step) if resume is not None and state.step == self.step_at_start else None
            state.eval = logged or _evaluate(cfg, accelerator, self.module, self.processor, self.log, state.step)
        summary = self._summary(wall)
        model = _full_model(cfg, accelerator, self.module) if self.t.export and self.stopped_by is None else None
        if model is not None:
            summary["export"] = str(_export(model, self.processor, self.run_dir))
        if accelerator.is_main_process:
            summary["plots"] = [str(p) for p in plot_curves(self.run_dir)]
            _write_json(self.run_dir / "summary.json", summary)
        accelerator.end_training()
        return summary

    def _summary(self, wall: float) -> dict[str, Any]:
        state, module, accelerator = self.state, self.module, self.accelerator
        return {"run_dir": str(self.run_dir), "world_size": self.world, "steps": state.step,
                "samples_seen": state.samples_seen, "stopped_by": self.stopped_by, "wall_time_s": wall,
                "samples_per_s": (state.samples_seen - self.samples_at_start) / max(wall, 1e-9),
                "nonfinite_steps": state.nonfinite_total, "dropped_epoch_tails": state.dropped_tail,
                "skipped_samples": self.stream.skipped_by_reason(), "ddp": ddp_record(module, self.unused),
                "final_metrics": {k: v for k, v in (self.log.last or {}).items()}, "eval": state.eval,
                "checkpoint": str(self.final), "distributed": sharding.describe(module, accelerator)}


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the experiment ``cfg``; returns the summary also written to ``run.dir/summary.json``."""
    return Trainer(cfg).run()


# ----------------------------------------------------------------------------------------------
# helpers


def _every(period: int, step: int) -> bool:
    """Whether something done every ``period`` steps (0: never) happens at ``step``."""
    return bool(period) and step % period == 0


class _StepFlags:
    """Each step's flags from the device (any rank asked to stop; the step was non-finite), read through a
    :class:`LaggedReadback` and applied to the state's non-finite counts in step order."""

    def __init__(self, state: _State, max_nonfinite: int):
        self.state, self.max_nonfinite = state, max_nonfinite
        self.readback = LaggedReadback()

    def after_step(self, flags: torch.Tensor, sync_now: bool) -> tuple[bool, int]:
        """Queue this step's ``flags`` (stop requests, non-finite); apply those read back (this step's too
        with ``sync_now``). Returns (whether a step asked to stop, the run of non-finite steps that reached
        ``max_nonfinite`` or 0); when either is set, this step is applied too: the state about to be saved
        counts it."""
        self.readback.push(flags)
        stop, diverged = self._apply(self.readback.take(flush=sync_now))
        if (stop or diverged) and not sync_now:
            more_stop, more_diverged = self._apply(self.readback.take(flush=True))
            stop, diverged = stop or more_stop, diverged or more_diverged
        return stop, diverged

    def _apply(self, steps: list[torch.Tensor]) -> tuple[bool, int]:
        stop, diverged = False, 0
        for stop_requests, bad in steps:
            stop = stop or bool(stop_requests > 0)
            self.state.nonfinite_run = self.state.nonfinite_run + 1 if bad else 0
            self.state.nonfinite_total += int(bool(bad))
            if self.state.nonfinite_run >= self.max_nonfinite:
                diverged = diverged or self.state.nonfinite_run
        return stop, diverged


def _flat(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as flat ``section.key`` -> scalar (for tracker hyper-parameters)."""
    from omegaconf import OmegaConf

    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) or node is None else str(node)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


def _tracker_kwargs(trackers: list[str], run_dir: Path) -> dict:
    return {"wandb": {"dir": str(run_dir)}} if "wandb" in trackers else {}


def _progress(accelerator, step: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, disable=not accelerator.is_main_process, unit="step",
                dynamic_ncols=True, desc="train")
