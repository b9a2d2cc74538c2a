"""A run's verdict: does the gradient signal flow, through the whole of training, and did the run learn?

The verdicts, in order of precedence (the first that holds is the run's ``verdict``):

``diverged``
    the loss or the gradient norm became NaN/Inf (``diverged_step``).
``dead``
    the backpropagated signal reaching the first Linear layer is exactly zero at every logged step from some
    step (``dead_step``) to the end of training, or from the start ("born dead"), because a layer above cuts
    it off (``dead_layer``: the lowest layer that still receives signal). A zero that is a float underflow,
    a signal decaying layer by layer below the dtype's smallest numbers, is not a cut: see :func:`zero_causes`.
``vanishing`` / ``exploding``
    grad_ratio_log10 lies beyond ``verdict.vanish_below`` / ``verdict.explode_above`` at step 0, or (when step 0
    is within both) its median over training does. A ratio of NaN (no signal at either end) counts as vanishing.
``stalled``
    gradients flow, but the run learned nothing beyond the trivial predictor: ``final_loss >= (1 -
    verdict.stall_margin) * baseline_loss`` (``losses.baseline_loss``: the training targets' variance for
    mse, the class prior's entropy for cross_entropy, none for projection).
``healthy``
    none of the above.

``init_verdict`` is the step-0 measurement alone: healthy, vanishing or exploding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

VERDICTS = ("healthy", "stalled", "vanishing", "exploding", "dead", "diverged")  # mildest to most severe
INIT_VERDICTS = ("healthy", "vanishing", "exploding")
SEVERITY = {v: i for i, v in enumerate(VERDICTS)}  # ties in a report's cell go to the worse verdict

# zero_causes codes
SIGNAL, CUT, UNDERFLOW, NO_SIGNAL = 0, 1, 2, 3


def underflow_floor(dtype: str) -> float:
    """The smallest signal that cannot underflow to exactly zero in one more layer: ``tiny / eps`` of the
    dtype (float32 ~1e-31, float64 ~1e-292). Reaching 0 from above it takes a per-layer factor below eps,
    which only a cut (every unit's derivative exactly 0) gives; a decaying signal passes through it first."""
    f = np.finfo(dtype)
    return float(f.tiny / f.eps)


def zero_causes(h: np.ndarray, floor: float) -> np.ndarray:
    """Why each backpropagated-signal norm is zero: ``h`` is (..., L) over the Linear layers, input side first.

    SIGNAL: not zero. CUT: exactly zero below a layer whose signal is at least ``floor`` (the zero comes from
    every unit's derivative being exactly 0: dead ReLUs, or a sigmoid/tanh saturated to its float bound).
    UNDERFLOW: zero below a signal under ``floor`` (a decaying signal rounded to 0). NO_SIGNAL: no layer above
    receives any.
    """
    out = np.full(h.shape, SIGNAL, dtype=np.int8)
    above = np.zeros(h.shape[:-1])  # the nearest non-zero signal above each layer (0: none yet)
    for layer in range(h.shape[-1] - 1, -1, -1):
        zero = h[..., layer] == 0
        cause = np.where(above == 0, NO_SIGNAL, np.where(above >= floor, CUT, UNDERFLOW))
        out[..., layer] = np.where(zero, cause, SIGNAL)
        above = np.where(zero, above, h[..., layer])
    return out


def dead_runs(h: np.ndarray, steps: np.ndarray, valid: np.ndarray, layer_numbers: np.ndarray,
              floor: float) -> tuple[np.ndarray, np.ndarray]:
    """``dead_step`` and ``dead_layer`` per run (-1 where the run is not dead).

    ``h`` (T, R, L): backpropagated-signal norms of the Linear layers; ``valid`` (T, R): logged steps before
    divergence; ``layer_numbers`` (L,): each Linear layer's block number. A run is dead when the first layer's
    zero is a CUT at every valid logged step from ``dead_step`` to its last one.
    """
    T, R, _ = h.shape
    causes = zero_causes(h, floor)
    cut = (causes[:, :, 0] == CUT) & valid
    dead_step = np.full(R, -1, dtype=np.int64)
    dead_layer = np.full(R, -1, dtype=np.int64)
    for r in range(R):
        rows = np.flatnonzero(valid[:, r])
        if rows.size == 0 or not cut[rows[-1], r]:
            continue
        live = rows[~cut[rows, r]]
        start = rows[rows > live[-1]][0] if live.size else rows[0]
        dead_step[r] = steps[start]
        zero = np.flatnonzero(h[rows[-1], r] == 0)  # at the last step: the cut is just above the highest zero
        dead_layer[r] = layer_numbers[zero[-1] + 1]
    return dead_step, dead_layer


def conditions(ratio0: np.ndarray, ratio_median: np.ndarray, final_loss: np.ndarray, baseline: np.ndarray,
               vanish_below: np.ndarray, explode_above: np.ndarray, stall_margin: np.ndarray) -> dict[str, np.ndarray]:
    """Each verdict's own condition, per run, independent of precedence (the tuner's constraints use them):
    vanishing, exploding, stalled; plus init_vanishing / init_exploding, the step-0 part alone."""
    with np.errstate(invalid="ignore"):
        v0, e0 = (ratio0 < vanish_below) | np.isnan(ratio0), ratio0 > explode_above
        vm, em = (ratio_median < vanish_below) | np.isnan(ratio_median), ratio_median > explode_above
        stalled = np.isfinite(baseline) & (final_loss >= (1 - stall_margin) * baseline)
    # Step 0 decides when it is beyond a threshold; otherwise the median over training does.
    return {"vanishing": v0 | (~e0 & vm), "exploding": e0 | (~v0 & em), "stalled": stalled,
            "init_vanishing": v0, "init_exploding": e0}


def verdicts(diverged: np.ndarray, dead: np.ndarray, cond: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(verdict, init_verdict) per run, from the divergence and dead flags and :func:`conditions`."""
    verdict = np.select([diverged, dead, cond["vanishing"], cond["exploding"], cond["stalled"]],
                        ["diverged", "dead", "vanishing", "exploding", "stalled"], "healthy").astype(object)
    init = np.select([cond["init_vanishing"], cond["init_exploding"]], ["vanishing", "exploding"], "healthy")
    return verdict, init.astype(object)


def counts_text(counts: dict[str, int]) -> str:
    """Counts as the summaries print them: ``4 healthy, 0 stalled, ...``, in the dict's order."""
    return ", ".join(f"{n} {name}" for name, n in counts.items())


def verdict_counts(runs: Any) -> dict[str, int]:
    """How many runs of ``runs`` (a runs table) got each verdict, every verdict named (0 where none)."""
    counts = runs["verdict"].value_counts()
    return {v: int(counts.get(v, 0)) for v in VERDICTS}


def edge_words(edge: dict[str, float | None]) -> str:
    """'stable from lr a up to lr b, unstable from lr c (and below lr d)', as far as the trials tell."""
    lo, hi = edge["smallest_stable_lr"], edge["largest_stable_lr"]
    up, down = edge["smallest_unstable_lr_above"], edge.get("largest_unstable_lr_below")
    if hi is None:
        return "nothing stable" + (f"; unstable from lr {up:.4g}" if up is not None else "")
    text = f"stable from lr {lo:.4g} up to lr {hi:.4g} ({edge.get('band_trials', 0)} trials, none unstable), "
    text += f"unstable from lr {up:.4g}" if up is not None else "nothing unstable seen above it"
    return text + (f"; unstable again below lr {down:.4g}" if down is not None else "")
