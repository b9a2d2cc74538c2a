"""The one definition of what gradsweep writes: the parquet schema of the runs and steps tables, their
file and directory names, and the schema version.

A run's tables are two zstd parquet files, in its own directory (a single run, Hydra's basic launcher) or
shared by its group in ``<sweep_dir>/groups/<first job>/`` (the fused launcher, whose runs rows then also
store ``run_dir``, each run's directory relative to the group's); ``gradsweep.results.store`` writes and reads both:

``runs.parquet``
    One row per run: ``run_id``, ``job_num``, ``override_dirname``, every config value flattened to a
    column named like its override key (``model.depth``, ``init``, ``optim.lr``, ``train.clip_norm``, ...;
    ``+key=value`` additions too), then the results in ``RESULT_COLUMNS``.
``steps.parquet``
    One row per logged step and layer (Linear layers 1..depth+1, norm layers; a module's Linear, Conv and norm
    layers), columns ``STEP_COLUMNS``.
    Rows stop at the step where a run diverged.

Nothing here imports torch: ``load_sweep`` reads a sweep without it.
"""

from __future__ import annotations

import functools

import pandas as pd
import pyarrow as pa

from gradsweep.config.checks import bare_type, field_hints
from gradsweep.config.identity import column_of
from gradsweep.config.sections import SECTIONS
from gradsweep.engine.records import LAYER_STATS

RUNS_FILE = "runs.parquet"
STEPS_FILE = "steps.parquet"
# A sweep's runs tables in one file, written at the end of a multirun (and by the report): reading
# 10,000 small files costs ~30 s, this one ~0.1 s. Used only while it lists exactly the run files
# present and none is newer than it; otherwise the files are read again.
RUNS_INDEX = "runs-index.parquet"
# The fused launcher writes one runs and one steps file per group of runs trained together, under
# <sweep_dir>/groups/<first job number>/; the runs file stores each row's run directory (relative to it).
GROUPS_DIR = "groups"
TUNE_DIR = "tune"  # where gradsweep.tune writes its study under an output directory; a sweep's loader skips it
TUNE_BEST_FILE, TUNE_TRIALS_FILE, TUNE_FIGURE_FILE = "best.json", "trials.csv", "stability.png"  # in TUNE_DIR
TRIALS_DIR = "trials"  # under TUNE_DIR: each trial's job directory, by trial number
JOB_SUBDIR = ".hydra"  # in a job directory: its config.yaml and overrides.yaml (Hydra's output_subdir)
# The tables' schema version, stored in every parquet file's metadata; a sweep written with an older one is
# refused by the report (its verdicts mean something else). 2: whole-run verdicts (gradsweep.results.verdicts);
# 3: the sharpness columns (read from a version-2 table as null).
SCHEMA_VERSION = 3
SCHEMA_KEY = b"gradsweep.schema"  # parquet metadata key, fixed since v1 (not the module path)

ID_COLUMNS: dict[str, pa.DataType] = {
    "run_id": pa.string(),  # hash of the run's full resolved config (gradsweep.config.sections.config_hash)
    "job_num": pa.int64(),  # Hydra's job number in a multirun; null for a single run
    "override_dirname": pa.string(),  # Hydra's override_dirname (the sweep overrides of this job)
}

RESULT_COLUMNS: dict[str, pa.DataType] = {
    "device": pa.string(),  # the device the run trained on (cpu, cuda:0, ...)
    "initial_loss": pa.float64(),  # loss at step 0, before any update
    "final_loss": pa.float64(),  # loss on the whole data set after the last step (NaN/inf if diverged)
    "min_loss": pa.float64(),  # smallest finite loss seen (logged steps and the final evaluation)
    "test_loss": pa.float64(),  # loss on the data's held-out points after the last step (NaN without them)
    "test_accuracy": pa.float64(),  # their accuracy, classification data (data=digits); NaN otherwise
    # first step with a non-finite loss or gradient norm (= train.steps if only the final loss is); null if none
    "diverged_step": pa.int64(),
    "diverged_reason": pa.string(),  # what was non-finite there: loss | gradient (its norm) | final loss; null if none
    "grad_ratio_log10": pa.float64(),  # log10(|dL/dh_1| / |dL/dh_{depth+1}|) at step 0: < 0 vanishing, > 0 exploding
    "grad_ratio_log10_median": pa.float64(),  # its median over the logged steps before divergence
    "wgrad_ratio_log10": pa.float64(),  # log10(|dL/dW_1| / |dL/dW_{depth+1}|) at step 0
    "wgrad_ratio_log10_median": pa.float64(),  # its median over the logged steps before divergence
    "pred_grad_ratio_log10": pa.float64(),  # mean-field prediction of grad_ratio_log10 (gradsweep.results.theory); NaN: none
    "pred_wgrad_ratio_log10": pa.float64(),  # mean-field prediction of wgrad_ratio_log10; NaN: none
    "pred_chi": pa.list_(pa.float64()),  # predicted per-block factor chi_l (|dL/dh_l|^2 / |dL/dh_l+1|^2), blocks 1..depth
    "pred_note": pa.string(),  # why theory makes no prediction for this run (residual, norm, ...); null when it does
    "baseline_loss": pa.float64(),  # the trivial predictor's loss on the training data (losses.baseline_loss); NaN: none
    "loss_drop_log10": pa.float64(),  # log10(initial_loss / final_loss): decades the loss fell
    "dead_step": pa.int64(),  # first logged step of the final stretch where no signal reaches layer 1 (a cut); null
    "dead_layer": pa.int64(),  # then: the lowest Linear layer that still receives signal (where it is cut off); null
    "init_verdict": pa.string(),  # healthy | vanishing | exploding, from grad_ratio_log10 at step 0 alone
    "verdict": pa.string(),  # the whole run: diverged | dead | vanishing | exploding | stalled | healthy (results.verdicts)
    # the top eigenvalue of the training loss's Hessian at step 0 (gradsweep.engine.curvature); null: not measured
    "sharpness_init": pa.float64(),
    "sharpness_iters": pa.int64(),  # the Hessian-vector products it took (Lanczos, to stats.sharpness_tol)
    "sharpness_converged": pa.bool_(),  # whether it reached stats.sharpness_tol within stats.sharpness_max_iter
    "sharpness_final": pa.float64(),  # the same after the last step
    "lr_edge_pred": pa.float64(),  # 2 (1 + momentum) / (sharpness_init + weight_decay): sgd (results.edge); null: none
    "lr_edge_note": pa.string(),  # why there is no prediction (adam, no sharpness); null when there is
    "lr_over_edge": pa.float64(),  # optim.lr / lr_edge_pred
    "phase": pa.string(),  # monotone | catapult | diverged | not_full_batch, from the loss curve (results.edge)
    "wall_s": pa.float64(),  # wall-clock seconds of the training call that trained this run
    "group_size": pa.int64(),  # how many runs trained together in that call
}

STEP_COLUMNS: dict[str, pa.DataType] = {
    "run_id": pa.string(),
    "step": pa.int64(),  # optimiser step; statistics are taken before that step's update
    "layer": pa.int64(),  # block number: 1..depth hidden blocks, depth + 1 the readout (a module: 1, 2, ... in forward order)
    "kind": pa.string(),  # linear | conv | norm
    "layer_name": pa.string(),  # linear3, norm3; a module's layer: its dotted path (blocks.3.fc1); null in older tables
    "loss": pa.float64(),  # the run's loss at this step (repeated on each layer's row)
    "grad_norm": pa.float64(),  # total gradient norm over all parameters, before clipping
    "clipped": pa.bool_(),  # whether clipping scaled this step's gradients
    "sharpness": pa.float64(),  # the top Hessian eigenvalue of the loss, where measured (stats.sharpness_every); null
    **{name: (pa.int64() if name == "wgrad_nonfinite" else pa.float64()) for name in LAYER_STATS},
}
STEPS_SCHEMA = pa.schema(list(STEP_COLUMNS.items()))

_PA_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


@functools.cache
def config_columns() -> dict[str, pa.DataType]:
    """Arrow types of the flattened config columns, derived from the dataclass schemas."""
    out = {}
    for section, cls in SECTIONS.items():
        hints, names = field_hints(cls)
        for name in names:
            typ = bare_type(hints[name])[0]
            if typ in _PA_TYPES:  # a mapping (model.net) is a column per key, typed by its values
                out[column_of(section, name)] = _PA_TYPES[typ]
    out["loss"] = pa.string()
    return out


def runs_schema(runs: pd.DataFrame) -> pa.Schema:
    """The runs table's schema: fixed types for the known columns, inferred ones for ``+key`` extras."""
    known = {**ID_COLUMNS, **config_columns(), **RESULT_COLUMNS}
    fields = []
    for col in runs.columns:
        typ = known.get(col) or pa.Array.from_pandas(runs[col]).type
        fields.append(pa.field(col, typ))
    return pa.schema(fields)


def versioned(table: pa.Table, version: int) -> pa.Table:
    return table.replace_schema_metadata({SCHEMA_KEY: str(version).encode()})


def schema_version(table: pa.Table) -> int:
    """The gradsweep schema version a table was written with (1: before versions were recorded)."""
    return int((table.schema.metadata or {}).get(SCHEMA_KEY, b"1"))


