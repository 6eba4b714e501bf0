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
    """Sums of the logged values over the current log window, kept on the device."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.names: tuple[str, ...] | None = None
        self.sums: torch.Tensor | None = None  # (len(names),) sums over the window's finite steps
        self.counted: torch.Tensor | None = None  # (1,) finite steps in the window
        self.steps = 0

    def add(self, values: dict[str, torch.Tensor], nonfinite: torch.Tensor) -> None:
        """Add one step's ``values`` (0-d or 1-element tensors) unless ``nonfinite`` (a (1,) bool device
        tensor) is set; nothing is read on the host."""
        names = tuple(values)
        device = nonfinite.device
        stacked = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(()) for v in values.values()])
        stacked = torch.where(nonfinite, torch.zeros_like(stacked), stacked)  # where, not *: NaN * 0 is NaN
        counted = (~nonfinite).float().reshape(1)
        if self.sums is None:
            self.names, self.sums, self.counted = names, stacked, counted
        elif names != self.names:
            raise ValueError(f"this step logged {sorted(names)} but the window's earlier steps logged "
                             f"{sorted(self.names)}; an objective must return the same metrics every step.")
        else:
            self.sums = self.sums + stacked
            self.counted = self.counted + counted
        self.steps += 1

    def take(self, accelerator: Any) -> dict[str, float]:
        """The window's means over steps and ranks (one reduce, one host read), plus
        ``window_nonfinite_steps``; starts the next window. Empty if no step was added."""
        if self.sums is None:
            return {}
        totals = accelerator.reduce(torch.cat([self.sums, self.counted]), "sum").tolist()
        counted = totals[-1]  # finite steps summed over ranks (the same steps on every rank)
        means = {name: total / counted if counted else float("nan") for name, total in zip(self.names, totals)}
        means[NONFINITE_KEY] = self.steps - round(counted / accelerator.num_processes)
        self._reset()
        return means
