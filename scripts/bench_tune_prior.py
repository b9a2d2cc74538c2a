"""How many trials the learning-rate search takes to locate its stability edge to within 10%, with the curvature
prior (tune.prior=curvature: lr in 0.1x .. 20x the edge 2 / lambda_0 predicts) and without it (tune.prior=none:
tune.lr_min .. tune.lr_max, 1e-4 .. 10), side by side on the same configurations and sampler seeds.

The edge is the tuner's own (gradsweep.tune.results.stable_band): the first unstable lr (diverged, dead, stalled,
... or its loss rose) above the widest band of stable trials. (An init whose signal vanishes at every lr, such as
PyTorch's default at depth 10, has no band and so no edge to find: it is not among the configurations.)
Its reference value per configuration is that of every trial of every study of it pooled (2 x --seeds
studies, the densest sampling there is). A study has located it once its own estimate, from its first k trials in
the order asked, is within 10% of the reference and stays so; the count is that k (a miss: more than --trials).
Trials run in batches of --batch (the sampler learns between batches).

    python scripts/bench_tune_prior.py [--trials 64] [--batch 4] [--seeds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile

import pandas as pd

from gradsweep.tune.cli import compose, tune_study
from gradsweep.tune.results import stable_band

CONFIGS = ["model.depth=10 init=kaiming", "model.depth=10 init=xavier", "model.depth=10 model.activation=tanh init=kaiming",
           "model.depth=3 model.width=32 model.activation=tanh"]


def edge_of(frame: pd.DataFrame) -> float | None:
    return stable_band(frame)[1]["smallest_unstable_lr_above"]


def trials_to_locate(frame: pd.DataFrame, reference: float, within: float = 0.1) -> int | None:
    frame = frame.sort_values("number").reset_index(drop=True)
    hit = None
    for k in range(1, len(frame) + 1):
        e = edge_of(frame.iloc[:k])
        close = e is not None and abs(e / reference - 1) <= within
        hit = (hit or k) if close else None
    return hit


def study(config: str, prior: str, seed: int, trials: int, batch: int, root: str) -> tuple[pd.DataFrame, dict]:
    out = f"{root}/{prior}-{seed}-{abs(hash(config))}"
    values, base, tune = compose([*config.split(), f"tune.prior={prior}", f"tune.seed={seed}",
                                  f"tune.n_trials={trials}", f"tune.batch_size={batch}", f"tune.out_dir={out}",
                                  "quiet=true"])
    with contextlib.redirect_stdout(io.StringIO()):
        summary = tune_study(values, base, tune, quiet=True)
    return pd.read_csv(f"{out}/tune/trials.csv"), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    miss = args.trials + 1
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for config in CONFIGS:
            frames = {(prior, seed): study(config, prior, seed, args.trials, args.batch, root)
                      for prior in ("curvature", "none") for seed in range(args.seeds)}
            pooled = pd.concat([f for f, _ in frames.values()], ignore_index=True).assign(number=lambda d: d.index)
            reference = edge_of(pooled)
            pred = frames[("curvature", 0)][1]["curvature"].get("lr_edge_pred")
            got = {prior: [trials_to_locate(frames[(prior, s)][0], reference) for s in range(args.seeds)]
                   for prior in ("curvature", "none")}
            med = {k: statistics.median(n if n is not None else miss for n in v) for k, v in got.items()}
            rows.append((config, pred, reference, med))
            print(f"{config}: predicted edge {pred:.4g}, measured {reference:.4g} ({len(pooled)} trials pooled); "
                  f"trials to 10%: prior {got['curvature']} none {got['none']}", flush=True)
    print(f"\ntrials to locate the edge to 10% (median of {args.seeds} sampler seeds; batches of {args.batch}; "
          f"'>{args.trials}': not within {args.trials})")
    print("| config | predicted edge 2/lambda_0 | measured edge | with the prior | without | without / with |")
    print("|---|---|---|---|---|---|")
    for config, pred, reference, med in rows:
        def fmt(v):
            return f">{args.trials}" if v >= miss else f"{v:g}"
        print(f"| `{config}` | {pred:.4g} | {reference:.4g} ({reference / pred:.2f}x) | {fmt(med['curvature'])} | "
              f"{fmt(med['none'])} | {med['none'] / med['curvature']:.2f}x |")


if __name__ == "__main__":
    main()
