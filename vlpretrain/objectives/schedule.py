"""Objectives that start mid-run: ``start`` (a step, or a fraction of ``train.steps``) and ``ramp``.

Steps are counted as the trainer's ``state.step``: the number of optimiser steps already done, so
the step about to run is step ``s`` and its update makes it ``s + 1``. An objective with start step
``S`` runs from step ``S`` on; with ``ramp = R > 0`` its weight is ``weight * min(1, (s - S + 1) / R)``
(``weight / R`` on its first step, the full weight from step ``S + R - 1``).

Design (the trainer wires it; :class:`~vlpretrain.objectives.combine.ObjectiveSet` holds the state):

* **Built at construction, run from the start step.** Every objective's modules (heads, mask token,
  the EMA teacher) exist from construction, so the module tree never changes: DDP and FSDP wrap it
  once, every rank holds the same parameters, and every checkpoint, before or after a start, has the
  same state-dict keys (resume and strict loads need no case for "not created yet"). Before its
  start an objective runs no forward (no FLOPs), its ``needs`` are left out of the shared forward,
  and its parameters are in no optimiser group. What it still costs is its parameters' memory.
* **Parameters join the optimiser at the start step, as new groups.** The optimiser is built from
  :meth:`ObjectiveSet.parameter_parts` at the step the run starts from: the model and the objectives
  starting at 0 first, then each delayed objective already started, in (start step, config order).
  At a start step the trainer appends the newly started parts in that same order
  (:func:`vlpretrain.train.optim.add_started_groups`, which also extends the LR scheduler). So a run
  resumed from any checkpoint builds exactly the groups the unbroken run had at that step, and the
  saved optimiser/scheduler states load one-to-one. AdamW state (moments, its step count for bias
  correction) is created by the first update, which is the start step: as for a fresh optimiser.
* **Every rank agrees** because everything here is a function of the step and the config, never
  of data or timing. Under DDP the delayed objectives' parameters get no gradient before their
  start, which DDP's start-up probe (train/unused.py, run at step 0) sees: it then searches for
  unused parameters every step (the trainer may instead re-wrap at the start step).
* **The weight is a device tensor** (``Objective.scheduled_weight``), updated in place: a ramp
  neither synchronises the host nor changes a torch.compile guard; a start changes the set of
  objectives that run, which recompiles once (TORCH_LOGS=recompiles on siglip2-base-debug with
  train.compile=true: one recompile, at the start step, guarded on the active tuple).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlpretrain.errors import ConfigError


def resolve_start(start: float, total_steps: int | None) -> int:
    """The start step of ``start``: itself when >= 1, ``floor(start * total_steps)`` when a fraction < 1."""
    if start >= 1:
        return int(start)
    if start == 0:
        return 0
    if total_steps is None:
        raise ValueError(f"start={start} is a fraction of train.steps, but the number of steps is not known; "
                         f"build the ObjectiveSet with total_steps=train.steps.")
    return math.floor(round(start * total_steps, 6))  # round first: 0.29 * 100 is 28.999999999999996


@dataclass(frozen=True)
class Schedule:
    """When an objective runs and how strongly: start step, ramp steps, full weight."""

    start: int
    ramp: int
    weight: float

    def active(self, step: int) -> bool:
        return step >= self.start

    def weight_at(self, step: int) -> float:
        """The objective's weight at ``step`` (0 before its start)."""
        if step < self.start:
            return 0.0
        if self.ramp <= 0:
            return self.weight
        return self.weight * min(1.0, (step - self.start + 1) / self.ramp)


def schedule_of(cfg: Any, total_steps: int | None) -> Schedule:
    """The :class:`Schedule` of an ObjectiveConfig (``start``, ``ramp``, ``weight``)."""
    return Schedule(resolve_start(cfg.start, total_steps), int(cfg.ramp), float(cfg.weight))


def check_starts(entries: Sequence[Mapping[str, Any]], total_steps: int) -> None:
    """A ConfigError, before training, for an objective whose ``start`` is at or beyond ``train.steps``
    (it would never run). The trainer's start-up checks call this with ``cfg.objectives, train.steps``."""
    for i, entry in enumerate(entries):
        start = entry.get("start", 0) or 0
        if start < 1:
            continue  # a fraction < 1 of train.steps always lies inside the run
        if int(start) >= total_steps:
            raise ConfigError(f"objectives[{i}] ({entry.get('name')}).start: step {int(start)} is at or beyond "
                              f"train.steps={total_steps}, so the objective would never run; give a step below "
                              f"{total_steps} or a fraction of train.steps (e.g. start: 0.8).")
