"""A training step the host never waits for: non-finite steps skipped on the device, figures read late.

Reading a device value on the host (``.item()``, ``float(t)``, ``if t:``) makes the host wait for every
kernel queued before it. Done in the step that queued them, the GPU then idles while the host prepares
the next step: the data, the launches of the next forward. Two pieces keep the step free of such reads:

- :func:`step_unless` skips the optimiser update of a non-finite step on the device (torch's fused
  AdamW takes a ``found_inf`` flag, as ``torch.amp.GradScaler`` uses it), so the decision needs no read;
- :class:`LaggedReadback` copies each step's small figures (stop requests, non-finite flags) to the
  host asynchronously and hands them over one step late, when the device has long finished them while
  the next step's kernels keep it busy. ``flush=True`` reads the latest at once, for the steps that
  log, evaluate or save anyway.
"""

from __future__ import annotations

import torch


def step_unless(optimizer, bad: torch.Tensor) -> None:
    """``optimizer.step()``, except where ``bad`` (a one-element bool tensor) is True: then parameters,
    moments and the step count stay as they were. Optimisers that take a device ``found_inf`` flag
    (torch's fused Adam/AdamW; ``optimizer`` may be accelerate's wrapper of one) decide on the device;
    others read ``bad`` on the host first."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not getattr(inner, "_step_supports_amp_scaling", False):
        if not bool(bad):
            optimizer.step()
        return
    inner.found_inf = bad.detach().reshape(()).float()  # 0-d float32, as GradScaler passes it
    try:
        optimizer.step()
    finally:
        del inner.found_inf


class LaggedReadback:
    """Per-step figures (1-D device tensors) read on the host one step after they were queued."""

    def __init__(self):
        self._pending: list[tuple[torch.Tensor, object]] = []

    def push(self, values: torch.Tensor) -> None:
        """Start copying this step's ``values`` to the host; nothing waits here."""
        values = values.detach()
        if values.device.type != "cuda":  # CPU: the values are already here (other devices: read at take)
            self._pending.append((values, None))
            return
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending.append((host, done))

    def take(self, flush: bool = False) -> list[torch.Tensor]:
        """The host copies of every pushed step but the latest, oldest first; with ``flush``, the latest too.
        Waits only for the device work queued before those steps' pushes."""
        ready = self._pending if flush else self._pending[:-1]
        self._pending = [] if flush else self._pending[-1:]
        out = []
        for host, done in ready:
            if done is not None:
                done.synchronize()
            out.append(host.cpu())
        return out
