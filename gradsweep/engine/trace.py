"""What training a group records: its trace (:class:`GroupTrace`, the host arrays the tables are built from) and
the record that gathers the logged steps on the device and copies them to the host once per block."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradsweep.engine.curvature import Sharpness
from gradsweep.engine.device import HOST_COPY_EVERY
from gradsweep.engine.mlp import Layer
from gradsweep.engine.records import LAYER_STATS

DIVERGED_REASONS = (None, "loss", "gradient", "final loss")


@dataclass
class GroupTrace:
    """What training a group recorded, as host arrays. T logged steps, R runs, L layers."""

    steps: np.ndarray
    """(T,) the logged step numbers."""
    loss: np.ndarray
    """(T, R) the loss at each logged step, before that step's update."""
    grad_norm: np.ndarray
    """(T, R) total gradient norm before clipping."""
    clipped: np.ndarray
    """(T, R) whether clipping scaled the gradients."""
    layer: np.ndarray | None
    """(T, R, L, len(schema.LAYER_STATS)) per-layer statistics in the training dtype, or None when not collected."""
    final_loss: np.ndarray
    """(R,) loss on the whole data set after the last step."""
    test_loss: np.ndarray
    """(R,) loss on the held-out points after the last step; NaN without them (data.n_test = 0)."""
    test_accuracy: np.ndarray
    """(R,) accuracy on the held-out points after the last step (classification data); NaN otherwise."""
    diverged_step: np.ndarray
    """(R,) first step with a non-finite loss or gradient norm (``steps`` = the final evaluation); -1 if none."""
    diverged_reason: np.ndarray
    """(R,) why: 'loss' (non-finite loss), 'gradient' (finite loss, non-finite gradient norm), 'final loss'; None."""
    wall_s: float
    """Wall-clock seconds for the whole group."""
    device: str
    engine: str = "eager"
    """The engine that trained the group (eager or compiled; engine=auto resolved)."""
    baseline_loss: float = float("nan")
    """The trivial predictor's loss on the training data (losses.baseline_loss); NaN where there is none."""
    input_q: float = float("nan")
    """The data's mean squared input entry (mean-field theory's q_in, for gradsweep.results.tables's predictions)."""
    in_dim: int = 0
    out_dim: int = 0
    """The data's input and output sizes."""
    layers: list[Layer] | None = None
    """The rows of ``layer``'s third axis (model.layers, or a module's recorded layers: gradsweep.engine.nets)."""
    sharpness: np.ndarray | None = None
    """(T, R) the top Hessian eigenvalue of each run's training loss at the logged steps where it was measured
    (before that step's update), NaN elsewhere; None where nothing was (stats.sharpness=false, or no second
    derivative)."""
    sharpness_final: np.ndarray | None = None
    """(R,) the same after the last step."""
    sharpness_iters: np.ndarray | None = None
    """(R,) the Hessian-vector products the measurement at step 0 took."""
    sharpness_converged: np.ndarray | None = None
    """(R,) whether it reached stats.sharpness_tol within stats.sharpness_max_iter."""


def logged(step: int, total: int, every: int) -> bool:
    return step % every == 0 or step == total - 1


class Record:
    """The logged steps' scalars and statistics, gathered on the device and copied to the host once per block."""

    def __init__(self, steps: int, every: int, R: int, L: int, collect_stats: bool, dtype: torch.dtype,
                 device: torch.device):
        self.collect_stats, self.device = collect_stats, device
        self.scalar, self.layer, self.host_scalar, self.logged = [], [], [], []
        # The statistics' host array, allocated once: each block of logged steps is stacked straight into it (one
        # copy of (R, L, S) per step, where a list of blocks concatenated at the end, then widened, is three).
        n_logged = sum(logged(s, steps, every) for s in range(steps))
        self.host_layer = (torch.empty(n_logged, R, L, len(LAYER_STATS), dtype=dtype) if collect_stats else None)

    def add(self, step: int, scal: torch.Tensor, lay: torch.Tensor | None) -> bool:
        """Keep one logged step; True when a block is full and was copied to the host."""
        self.scalar.append(scal)
        self.logged.append(step)
        if self.collect_stats:
            self.layer.append(lay)
        if len(self.scalar) < HOST_COPY_EVERY:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        if not self.scalar:
            return
        done = sum(len(block) for block in self.host_scalar)
        self.host_scalar.append(torch.stack(self.scalar).cpu())
        if self.collect_stats:
            into = self.host_layer[done:done + len(self.layer)]
            if self.device.type == "cpu":
                torch.stack(self.layer, out=into)
            else:
                into.copy_(torch.stack(self.layer))
        self.scalar.clear()
        self.layer.clear()


class SharpnessLog:
    """The sharpness measured through training: at the first logged step, then every ``every`` logged steps (0:
    the first only), and after the last step. Each measurement is a (R,) host array."""

    def __init__(self, every: int):
        self.every = every
        self.at: dict[int, np.ndarray] = {}
        """logged-step index -> values."""
        self.first: Sharpness | None = None
        self.final: np.ndarray | None = None
        self.error: str | None = None

    def due(self, index: int) -> bool:
        """Whether the ``index``-th logged step is measured (none once a measurement failed)."""
        return self.error is None and (index == 0 or (self.every > 0 and index % self.every == 0))

    def add(self, index: int | None, s: Sharpness) -> None:
        """Keep ``s``, measured at the ``index``-th logged step (None: after the last step)."""
        self.error = self.error or s.error
        if index == 0:
            self.first = s
        if index is None:
            self.final = s.value.double().numpy()
        else:
            self.at[index] = s.value.double().numpy()

    def fields(self, T: int, n: int) -> dict:
        """The trace's sharpness fields for its T logged steps and first n runs (all None after a failure)."""
        if self.error is not None or self.first is None:
            return {}
        table = np.full((T, n), np.nan)
        for i, v in self.at.items():
            if i < T:
                table[i] = v[:n]
        final = self.final[:n] if self.final is not None else np.full(n, np.nan)
        return {"sharpness": table, "sharpness_final": final,
                "sharpness_iters": self.first.iters.numpy()[:n], "sharpness_converged": self.first.converged.numpy()[:n]}
