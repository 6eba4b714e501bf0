"""The training stream cuts an objective's extra views only from that objective's start.

Objectives declare extra views (self-distillation's local crops, :mod:`vlpretrain.data.views`) that the
data workers cut from each decoded image. The SigLIP 2 recipe starts them at 80% of training: cutting
them from step 0 would spend worker time, the usual limit of a GPU run, on crops nobody reads. So the
workers cut the views of the objectives running at the current step only:

* The trainer builds its stream with the views of the objectives running at the step it starts from
  (0, or a resumed checkpoint's step: a run resumed after a start cuts them at once).
* Before each step, :meth:`StreamViews.at_step` compares them with the views of the objectives running at
  that step. When they differ (an objective that reads views starts), it stops the stream's iterator (its
  workers shut down) and builds a stream with the new views that continues from the old one's
  :meth:`~vlpretrain.data.shards.ShardStream.state_dict`: the position after the last *delivered* batch,
  the same state a checkpoint saves. Batches the workers had prefetched but not delivered are read
  again, now with views; no sample is lost or repeated, and the clean views, captions and positions are
  those of a stream cutting the views from step 0 (the views draw from their own generators).

With ``data.decode=device`` the workers decode nothing and cut no views (the objectives cut theirs on
the device from the clean view), so the stream is never rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from vlpretrain.data.shards import ShardStream
from vlpretrain.data.views import ViewSpec


class StreamViews:
    """Which extra views the training stream cuts at each step, and the stream rebuilt when they change."""

    def __init__(self, objectives, build: Callable[..., ShardStream], say: Callable[[str], None] = print):
        """``objectives``: the ObjectiveSet (its schedules say who runs when); ``build(views=...)``: a new training
        stream cutting ``views`` (the trainer's ShardStream arguments but the views); ``say``: prints a switch."""
        self.objectives, self.build, self.say = objectives, build, say
        self.declared = objectives.views()  # every configured objective's (one spec per name, checked here)

    def views_at(self, step: int) -> dict[str, ViewSpec]:
        """The views of the objectives that run at ``step``."""
        running = set().union(*(obj.views() for key, obj in self.objectives.objectives.items()
                                if hasattr(obj, "views") and self.objectives.schedules[key].active(step)))
        return {name: spec for name, spec in self.declared.items() if name in running}

    def stream_at(self, step: int) -> ShardStream:
        """The stream for a run that starts (or resumes) at ``step``."""
        return self.build(views=self.views_at(step))

    def note(self, stream: ShardStream) -> str | None:
        """What the trainer prints at start-up about the views (with data.decode=device), or None."""
        if self.declared and stream.decode_on_device:
            return (f"data.decode=device: the workers decode no images, so the views {sorted(self.declared)} are "
                    f"cut on the device from each batch's clean view (objectives/views.py).")
        return None

    def at_step(self, stream: ShardStream, it: Iterator, step: int) -> tuple[ShardStream, Iterator]:
        """``(stream, it)`` for the step ``step`` about to run: as given, or, when the views to cut change here,
        a new stream continuing exactly where ``stream`` stood, with a fresh iterator (``it`` is closed)."""
        views = self.views_at(step)
        if stream.decode_on_device or views == stream.views:
            return stream, it
        state = stream.state_dict()  # after the last delivered batch, as a checkpoint would save it
        if hasattr(it, "close"):
            it.close()  # the old workers stop; what they prefetched is read again by the new ones
        new = self.build(views=views)
        new.load_state_dict(state)
        self.say(f"[step {step}] the data workers now cut the views {sorted(views)} (restarted at the data position; "
                 f"the batches they had prefetched are read again)")
        return new, iter(new)
