"""Log-window means of each step's loss, per-objective losses and objective metrics.

Each step's values are added into one device tensor (no host read); the log step reduces the sums
across ranks once and reads them once. A logged ``loss`` is thus the mean over the window's steps
and ranks, not the value of the window's last step.

Steps whose loss or gradient was non-finite (the steps the optimiser skipped; under fp16, the steps
with a non-finite loss) are left out of the means: one NaN would make the whole window's mean NaN.
Their number is logged as ``window_nonfinite_steps``; a window of only such steps logs NaN means.
"""

from __future__ import annotations

from typing import Any

import torch

NONFINITE_KEY = "window_nonfinite_steps"


def step_values(out: Any) -> dict[str, torch.Tensor]:
    """The values of one step's ``ObjectiveSetOutput`` that are logged as window means:
    ``loss``, ``loss/<objective>`` and the objectives' metrics (``<objective>/<metric>``)."""
    return {"loss": out.loss, **{f"loss/{k}": v for k, v in out.losses.items()}, **out.metrics}


class WindowMeans:
    """Sums of the logged values over the current log window, kept on the device. An objective that
    starts mid-window (``start``) adds its names from then on: each name's mean is over the steps that
    logged it."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.names: tuple[str, ...] = ()
        self.sums: torch.Tensor | None = None  # (len(names),) sums over the window's finite steps
        self.counts: torch.Tensor | None = None  # (len(names),) finite steps that logged each name
        self.finite: torch.Tensor | None = None  # (1,) finite steps in the window
        self.steps = 0

    def add(self, values: dict[str, torch.Tensor], nonfinite: torch.Tensor) -> None:
        """Add one step's ``values`` (0-d or 1-element tensors) unless ``nonfinite`` (a (1,) bool device
        tensor) is set; nothing is read on the host."""
        device = nonfinite.device
        if self.sums is None:
            self.sums, self.counts = torch.zeros(0, device=device), torch.zeros(0, device=device)
            self.finite = torch.zeros(1, device=device)
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ValueError(f"this step did not log {sorted(missing)}, which the window's earlier steps logged; "
                             f"an objective must return the same metrics every step once it runs.")
        new = tuple(n for n in values if n not in self.names)
        if new:  # e.g. an objective starting at this step
            self.names += new
            self.sums = torch.cat([self.sums, torch.zeros(len(new), device=device)])
            self.counts = torch.cat([self.counts, torch.zeros(len(new), device=device)])
        stacked = torch.stack([torch.as_tensor(values[n], device=device).detach().float().reshape(())
                               for n in self.names])
        counted = (~nonfinite).float().reshape(1)
        self.sums = self.sums + torch.where(nonfinite, torch.zeros_like(stacked), stacked)  # where: NaN * 0 is NaN
        self.counts = self.counts + counted
        self.finite = self.finite + counted
        self.steps += 1

    def take(self, accelerator: Any) -> dict[str, float]:
        """The window's means over steps and ranks (one reduce, one host read), plus
        ``window_nonfinite_steps``; starts the next window. Empty if no step was added."""
        if self.sums is None:
            return {}
        n = len(self.names)
        totals = accelerator.reduce(torch.cat([self.sums, self.counts, self.finite]), "sum").tolist()
        sums, counts, finite = totals[:n], totals[n:2 * n], totals[-1]  # counts summed over ranks (same steps)
        means = {name: total / count if count else float("nan") for name, total, count in zip(self.names, sums, counts)}
        means[NONFINITE_KEY] = self.steps - round(finite / accelerator.num_processes)
        self._reset()
        return means
