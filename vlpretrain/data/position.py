"""The data position: where a training stream stands, in terms of shards and samples (not ranks and workers).

Vocabulary (see data/README.md "Resuming" for the file format):

- A **task** ``[shard, start, keep]`` is a piece of one shard still to read: its sample groups from index
  ``start`` on, plus the groups listed in ``keep`` (samples read before the save that still sat in a
  shuffle buffer). ``start = None``: only ``keep``. A group is one key of the tar (bad ones included), so
  the indices are a property of the shard file, the same for any reader.
- A **worker plan** is one dataloader worker's work for the rest of an epoch: its tasks in reading order,
  the shuffle buffer's slots (``[task, index]`` in slot order), how many draws its RNG made, whether it
  was already draining, and the number of samples it has emitted (the position that seeds augmentation).
- The **remaining** work of an epoch is the concatenation of every worker's tasks: world-size independent.
  A resume with another layout deals it out again (:func:`distribute`); one with the same layout gives
  each worker its own plan back, which continues bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, NamedTuple

from vlpretrain.config import ConfigError

FORMAT = "vlpretrain-data-position/1"


class Task(NamedTuple):
    """A piece of one shard still to read (see module doc)."""

    shard: int
    start: int | None
    keep: tuple[int, ...] = ()

    def to_json(self) -> list:
        return [self.shard, self.start, list(self.keep)]

    @classmethod
    def from_json(cls, value: list) -> Task:
        shard, start, keep = value
        return cls(int(shard), None if start is None else int(start), tuple(int(k) for k in keep))


@dataclass
class WorkerPlan:
    """One worker's work for the rest of an epoch (see module doc)."""

    tasks: list[Task] = field(default_factory=list)
    slots: list[tuple[int, int]] = field(default_factory=list)
    draws: int = 0
    draining: bool = False
    cursor: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"tasks": [t.to_json() for t in self.tasks], "slots": [list(s) for s in self.slots],
                "draws": self.draws, "draining": self.draining, "cursor": self.cursor}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> WorkerPlan:
        return cls([Task.from_json(t) for t in value["tasks"]], [(int(t), int(i)) for t, i in value["slots"]],
                   int(value["draws"]), bool(value["draining"]), int(value["cursor"]))


def advance(plan: WorkerPlan, snapshot: dict[str, Any], cursor: int) -> WorkerPlan:
    """The plan left after the worker reported ``snapshot`` with a batch: ``task``/``group`` (how far its
    reader got: the task in progress and the groups of it read), ``slots`` (what its shuffle buffer holds,
    ``[task, index]`` of ``plan``), ``draws`` and ``draining``. Tasks read to the end keep only their
    buffered samples; the task in progress continues after its last read group."""
    current, group = int(snapshot["task"]), int(snapshot["group"])
    slots = [(int(t), int(i)) for t, i in snapshot["slots"]]
    buffered: dict[int, set[int]] = {}
    for t, index in slots:
        buffered.setdefault(t, set()).add(index)
    tasks: list[Task] = []
    renumber: dict[int, int] = {}
    for t in sorted(t for t in buffered if t < current):
        renumber[t] = len(tasks)
        tasks.append(Task(plan.tasks[t].shard, None, tuple(sorted(buffered[t]))))
    if current < len(plan.tasks):
        task = plan.tasks[current]
        start = None if task.start is None else max(task.start, group)
        keep = {k for k in task.keep if k >= group} | buffered.get(current, set())
        if start is not None or keep:
            renumber[current] = len(tasks)
            tasks.append(Task(task.shard, start, tuple(sorted(keep))))
        tasks += plan.tasks[current + 1:]
    return WorkerPlan(tasks, [(renumber[t], i) for t, i in slots], int(snapshot["draws"]),
                      bool(snapshot["draining"]), cursor)


def distribute(tasks: list[Task], world_size: int, num_workers: int) -> list[list[Task]]:
    """Deal ``tasks`` (an epoch's remaining work) out to ``world_size * num_workers`` readers: pieces of
    started shards first (each reader gets one before any gets two), then unstarted shards, round-robin in
    the given order. Reader ``rank * num_workers + worker`` gets entry ``[rank * num_workers + worker]``."""
    slots = world_size * num_workers
    started = [t for t in tasks if t.start != 0 or t.keep]
    ordered = started + [t for t in tasks if not (t.start != 0 or t.keep)]
    return [ordered[g::slots] for g in range(slots)]


# -- the data spec: what a position is a position in --------------------------------------------------


def data_spec(sources: list[list[str]], *, seed: int, mode: str, weights: list[float] | None) -> dict[str, Any]:
    """What must not change between a save and its resume. Shards are identified by file name (the part
    after the last ``/``) in source order, so data copied to another folder or served over http is the same."""
    names = [[PurePosixPath(url.split("?")[0]).name for url in urls] for urls in sources]
    digest = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
    flat = [n for urls in names for n in urls]
    return {"shards": len(flat), "shard_names_sha256": digest, "first_shard": flat[0], "last_shard": flat[-1],
            "sources": len(sources), "seed": seed, "mode": mode, "weights": weights if mode == "resampled" else None}


def spec_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two data specs, in words (empty: the same)."""
    changes = []
    if saved.get("shard_names_sha256") != now["shard_names_sha256"] or saved.get("sources") != now["sources"]:
        changes.append(f"the shard list (saved: {saved.get('shards')} shards in {saved.get('sources')} source(s), "
                       f"{saved.get('first_shard')} .. {saved.get('last_shard')}; now: {now['shards']} shards in "
                       f"{now['sources']} source(s), {now['first_shard']} .. {now['last_shard']})")
    for key, name in (("seed", "run.seed"), ("mode", "data.mode"), ("weights", "data.train_weights")):
        if saved.get(key) != now[key]:
            changes.append(f"{name} (saved {saved.get(key)!r}, now {now[key]!r})")
    return changes


def check_position(position: dict[str, Any], spec: dict[str, Any], source: str) -> None:
    """A ConfigError naming what changed and the fix, when ``position`` cannot be continued under ``spec``."""
    if position.get("format") != FORMAT:
        raise ConfigError(f"{source}: not a data position this version reads (format {position.get('format')!r}, "
                          f"expected {FORMAT!r}). Resume it with the vlpretrain version that wrote it, or start a "
                          "new run.dir with train.init_from=<that checkpoint> (keeps the weights, restarts the data).")
    changes = spec_changes(position["spec"], spec)
    if changes:
        raise ConfigError(f"cannot resume the data stream from {source}: the data spec changed: {'; '.join(changes)}. "
                          "A position counts samples of those shards in that order, so it cannot be continued on "
                          "others. Fix: resume with the data.train, data.mode, data.train_weights and run.seed the "
                          "checkpoint was trained with (the number of processes, data.num_workers and the batch size "
                          "may change), or start a new run.dir with train.init_from=<that checkpoint> to keep the "
                          "weights and start the new data from its beginning.")
