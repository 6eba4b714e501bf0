"""The weighted sum of the configured objectives, from the fewest forwards.

:class:`ObjectiveSet` is the module a trainer optimises (and wraps in DDP / ``accelerator.prepare``):
it owns the model and the objectives (whose own parameters, e.g. the logit scale or an MAE
decoder, are thereby trained and synchronised too). Its forward checks the batch, runs the shared
forward for the union of the objectives' ``needs`` once, then each objective, and returns the
total loss with per-objective losses and metrics.

Objectives may start mid-run (``start``, ``ramp``; design in :mod:`vlpretrain.objectives.schedule`):
``set_step(step)`` before each step selects the active ones and their weights, and starts the EMA
teacher (:mod:`vlpretrain.objectives.teacher`) when the first objective needing it starts;
``after_optimizer_step()`` after each optimiser step updates the teacher and the objectives' own
state; ``parameter_parts`` says which parameters an optimiser holds at a step.

It also serves exact gradient accumulation for batch-coupled objectives
(:mod:`vlpretrain.train.accumulate`): ``embed_only=True`` returns their embeddings, and
``grad_cache=`` turns the total into the surrogate whose gradient is the big-batch gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vlpretrain.objectives.base import CoupledObjective, Objective
from vlpretrain.objectives.schedule import Schedule, schedule_of
from vlpretrain.objectives.shared import shared_forward
from vlpretrain.objectives.teacher import EMATeacher, TeacherConfig, check_backbone

# what each batch entry is, for error messages
_KEY_HELP = {"pixel_values": "images", "input_ids": "caption token ids", "attention_mask": "caption mask"}


@dataclass
class ObjectiveSetOutput:
    """``loss`` (to backpropagate), per-objective unweighted ``losses`` and ``metrics`` (detached)."""

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # "objective/metric"
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # embed_only


@dataclass
class GradCache:
    """What one micro-batch's recompute pass needs (built by :mod:`vlpretrain.train.accumulate`).

    embedding_grads: objective -> embedding name -> dLoss/d(embedding) of this micro-batch's rows;
    param_grads: objective -> parameter name -> dLoss/d(parameter) of the coupled loss (given on one
    micro-step only); share: this micro-batch's share of the examples, weighting the other losses.
    """

    embedding_grads: dict[str, dict[str, torch.Tensor]]
    param_grads: dict[str, dict[str, torch.Tensor]]
    share: float


class ObjectiveSet(nn.Module):
    """A model and its objectives: ``forward(batch)`` gives the weighted total loss."""

    def __init__(self, model: nn.Module, objectives: Sequence[Objective], total_steps: int | None = None,
                 teacher: TeacherConfig | None = None):
        """``total_steps`` (train.steps): needed by fractional starts and the teacher's momentum schedule;
        ``teacher``: the teacher section (defaults when None), used when an objective needs the teacher."""
        super().__init__()
        if not objectives:
            raise ValueError("no objectives configured; add at least one entry under `objectives`.")
        names = [o.name for o in objectives]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"objective(s) {dupes} configured more than once; keep one entry per name.")
        self.model = model
        # coupled objectives first: accumulation replays their embeddings, which must draw the same
        # random numbers in both passes (the shared forward runs before everything else)
        ordered = sorted(objectives, key=lambda o: not o.coupled)
        self.objectives = nn.ModuleDict({o.name: o for o in ordered})
        self.schedules: dict[str, Schedule] = {o.name: schedule_of(o.cfg, total_steps) for o in objectives}
        self._config_order = names
        if all(s.start > 0 for s in self.schedules.values()):
            raise ValueError(f"every configured objective starts after step 0 ({', '.join(names)}); a step needs a "
                             f"loss, so let at least one run from the start (start: 0).")
        self.step = -1  # set_step(0) below: the state of a fresh run
        self._weights: dict[str, float] = {}  # the scheduled weights last written to the objectives' buffers
        self.teacher: EMATeacher | None = None
        self._teacher_initialised_at: int | None = None
        needing = [o for o in objectives if o.needs_teacher]
        if needing:
            check_backbone(model, [o.name for o in needing])
            self.teacher_start = min(self.schedules[o.name].start for o in needing)
            self.teacher = EMATeacher(model.backbone, self._student_heads(), teacher or TeacherConfig(),
                                      self.teacher_start, total_steps)
        self.set_step(0)

    # -- the schedule ---------------------------------------------------------------------------
    def active(self) -> dict[str, Objective]:
        """The objectives that run at the current step (coupled first, then config order)."""
        return {k: self.objectives[k] for k in self._active}

    def set_step(self, step: int) -> None:
        """Begin step ``step`` (optimiser steps done): active objectives, their weights, the teacher's start.
        Call it before each step's forwards: it also drops what objectives gathered for their
        ``after_optimizer_step`` outside a step (e.g. from the trainer's start-up probe forward)."""
        for obj in self.objectives.values():
            begin = getattr(obj, "begin_step", None)
            if begin is not None:
                begin()
        if step == self.step:
            return
        self.step = step
        # what forward reads is decided here, once per step, and changes only at a start: under torch.compile
        # a guard on the step itself would recompile every step
        self._active = tuple(k for k in self.objectives if self.schedules[k].active(step))
        self._teacher_on = self.teacher is not None and step >= self.teacher_start
        # what the shared forward computes: the union of the active objectives' needs
        self.needs = frozenset().union(*(o.needs for o in self.active().values()))
        for key, obj in self.objectives.items():
            weight = self.schedules[key].weight_at(step)
            if self._weights.get(key) != weight:  # filled on the device only when it changes (no host read)
                obj.scheduled_weight.fill_(weight)
                self._weights[key] = weight
        if self.teacher is not None and step == self.teacher_start and self._teacher_initialised_at != step:
            self.teacher.initialise(self.model.backbone, self._student_heads())
            self._teacher_initialised_at = step

    def views(self) -> dict:
        """The extra views (name -> ``vlpretrain.data.views.ViewSpec``) the configured objectives read, for
        the data workers; one name, one spec."""
        found: dict = {}
        for key, obj in self.objectives.items():
            for name, spec in (obj.views() if hasattr(obj, "views") else {}).items():
                if found.get(name, spec) != spec:
                    raise ValueError(f"objective '{key}' declares view '{name}' as {spec}, another objective as "
                                     f"{found[name]}; give them the same crops or different names.")
                found[name] = spec
        return found

    def teacher_active(self) -> bool:
        """Whether the EMA teacher has started (it runs and is updated from its start step on)."""
        return self._teacher_on

    def shard_units(self) -> list[nn.Module]:
        """Modules FSDP2 shards as units of their own besides its class-named ones (vlpretrain.train.sharding):
        the EMA teacher's (:meth:`EMATeacher.shard_units`)."""
        return self.teacher.shard_units() if self.teacher is not None else []

    def _student_heads(self) -> dict[str, nn.Module]:
        """The objectives' modules the teacher mirrors, one ModuleDict per teacher-needing objective."""
        return {k: nn.ModuleDict(o.teacher_modules()) for k, o in self.objectives.items() if o.needs_teacher}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Call once after each optimiser step (the one that ran at the current step): updates the EMA
        teacher and calls the active objectives' own ``after_optimizer_step`` (e.g. a centre's EMA)."""
        if self.teacher_active():
            self.teacher.update(self.model.backbone, self._student_heads(), self.step + 1)
        for obj in self.active().values():
            hook = getattr(obj, "after_optimizer_step", None)
            if hook is not None:
                hook()

    def parameter_parts(self, before_step: int) -> list[tuple[str, list[tuple[str, nn.Parameter]], set[str]]]:
        """The trainable parameters an optimiser holds when step ``before_step`` is about to run, in
        parts: (label, named parameters, names kept out of weight decay). The first part is the model
        and the objectives starting at 0; then one part per delayed objective started before it,
        in (start, config order): the order :meth:`parts_starting_at` adds them in an unbroken run."""
        base = [("model", self.model)] + [(f"objectives.{k}", o) for k, o in self.objectives.items()
                                          if self.schedules[k].start == 0]
        named = [(f"{prefix}.{n}", p) for prefix, m in base for n, p in m.named_parameters() if p.requires_grad]
        parts = [("model", named, self.no_weight_decay())]
        delayed = sorted((s.start, self._config_order.index(k), k) for k, s in self.schedules.items()
                         if 0 < s.start < before_step)
        return parts + [self._part(k) for _, _, k in delayed]

    def parts_starting_at(self, step: int) -> list[tuple[str, list[tuple[str, nn.Parameter]], set[str]]]:
        """The parts of the delayed objectives whose start is ``step`` (config order): the trainer adds
        them to the optimiser as new groups right before that step runs."""
        starting = [k for k in self._config_order if 0 < self.schedules[k].start == step]
        return [self._part(k) for k in starting]

    def _part(self, key: str):
        obj = self.objectives[key]
        named = [(f"objectives.{key}.{n}", p) for n, p in obj.named_parameters() if p.requires_grad]
        return (f"objectives.{key}", named, {f"objectives.{key}.{n}" for n in obj.no_weight_decay()})

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in ``named_parameters()``) to keep out of weight decay."""
        names = {f"model.{n}" for n in self.model.no_weight_decay()}
        for key, obj in self.objectives.items():  # (every objective: parts pick their own names)
            names |= {f"objectives.{key}.{n}" for n in obj.no_weight_decay()}
        return names

    def coupled(self) -> dict[str, CoupledObjective]:
        return {k: o for k, o in self.active().items() if o.coupled}

    def check_batch(self, batch: dict) -> dict:
        """The batch with ``attention_mask`` filled in (ids != pad) if absent; a clear error if an objective lacks input."""
        have = sorted(k for k, v in batch.items() if v is not None)
        for key, obj in self.active().items():
            for need in obj.batch_keys:
                if batch.get(need) is None:
                    raise ValueError(f"objective '{key}' needs '{need}' ({_KEY_HELP.get(need, need)}) in the batch, "
                                     f"but the batch has only {have}; feed image-text pairs or remove '{key}' "
                                     f"from `objectives`.")
        if batch.get("input_ids") is not None and batch.get("attention_mask") is None:
            batch = {**batch, "attention_mask": (batch["input_ids"] != self.model.config.pad_token_id).long()}
        return batch

    def forward(self, batch: dict, *, embed_only: bool = False, grad_cache: GradCache | None = None
                ) -> ObjectiveSetOutput:
        batch = self.check_batch(batch)
        active = self.active()
        shared = shared_forward(self.model, batch, self.needs)
        out = ObjectiveSetOutput()
        if embed_only:
            out.embeddings = {k: o.embed(self.model, batch, shared) for k, o in self.coupled().items()}
            return out
        if self.teacher_active() and any(o.needs_teacher for o in active.values()):
            shared.teacher = self.teacher
            with torch.no_grad():  # the teacher sees the clean view, whole (it is always in eval mode)
                shared.teacher_image = self.teacher.backbone(pixel_values=batch["pixel_values"], layout="image").image
        terms = []
        for key, obj in active.items():
            if grad_cache is not None and obj.coupled:
                # surrogate: <embedding, cached gradient> (+ <parameter, its gradient> once) has the
                # gradient of the whole-batch coupled loss with respect to everything upstream
                grads = grad_cache.embedding_grads[key]
                term = sum((emb * grads[name]).sum()
                           for name, emb in obj.embed(self.model, batch, shared).items() if name in grads)
                params = dict(obj.named_parameters())
                for name, grad in grad_cache.param_grads.get(key, {}).items():
                    term = term + (params[name] * grad).sum()
            else:
                res = obj(self.model, batch, shared)
                out.losses[key] = res.loss.detach()
                out.metrics.update({f"{key}/{m}": v.detach() for m, v in res.metrics.items()})
                term = obj.weight * res.loss * (grad_cache.share if grad_cache is not None else 1.0)
            terms.append(term)
        # a new tensor, never one the output also holds detached: with one objective of weight 1 the total
        # is its loss, and torch.compile's inductor then returned one tensor for both outputs, marked
        # non-differentiable (the compiled loss had no graph; torch 2.14, tests/test_compile.py)
        out.loss = torch.stack(terms).sum()
        return out
