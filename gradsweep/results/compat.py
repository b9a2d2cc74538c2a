"""Tables written by an older gradsweep, read as today's code writes them: config keys added since with their
defaults, results added since (the sharpness, schema 3) null, and derived columns (data sizes, layer names) as they
are now. The report refuses only tables whose verdicts mean something else (``VERDICTS_SINCE``)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from gradsweep.config.identity import ADDED_KEYS, column_of
from gradsweep.config.sections import builtin_dims
from gradsweep.results.schema import RESULT_COLUMNS, config_columns

VERDICTS_SINCE = 2
"""The oldest schema version whose verdicts mean what they mean now: the report reads it and later ones."""


def upgrade_runs(table: pa.Table) -> pa.Table:
    """A runs table written before some config keys existed (``identity.ADDED_KEYS``), with their columns where
    today's code puts them, holding their defaults: what it would write for those runs today; and before some
    results did (the sharpness, schema 3), with theirs null. data.in_dim and data.out_dim held 16 for every data but
    gaussian before they were the data's sizes: they get those sizes (regression, scaled, digits; a data=arrays
    table of then keeps 16)."""
    table = _data_sizes(table)
    columns = {**config_columns(), **RESULT_COLUMNS}
    order = list(columns)
    added = [(column_of(section, key), default) for section, keys in ADDED_KEYS.items() for key, default in keys.items()]
    if "verdict" in table.column_names:  # a runs table, not a bare config's
        added += [(col, None) for col in RESULT_COLUMNS]
    for col, default in added:
        if col in table.column_names or col not in columns:  # model.net: columns only where set
            continue
        before = [c for c in order[:order.index(col)] if c in table.column_names]
        at = table.column_names.index(before[-1]) + 1 if before else table.num_columns
        typ = columns[col]
        table = table.add_column(at, pa.field(col, typ), pa.array([default] * table.num_rows, typ))
    return table


def _data_sizes(table: pa.Table) -> pa.Table:
    if not {"data", "data.in_dim", "data.out_dim", "data.n_features"} <= set(table.column_names):
        return table
    rows = zip(*(table.column(c).to_pylist() for c in ("data", "data.in_dim", "data.out_dim", "data.n_features")))
    fixed = [builtin_dims(d, nf) if d in ("regression", "scaled", "digits") and out == 16 else (i, out)
             for d, i, out, nf in rows]
    for k, col in enumerate(("data.in_dim", "data.out_dim")):
        at = table.column_names.index(col)
        table = table.set_column(at, table.field(at), pa.array([f[k] for f in fixed], table.field(at).type))
    return table


def upgrade_steps(table: pa.Table) -> pa.Table:
    """Steps written before layer_name existed (every one the built-in MLP's), with the name today's code writes:
    kind and layer number (linear3, norm3)."""
    if "layer_name" not in table.column_names or table.column("layer_name").null_count == 0:
        return table
    derived = pc.binary_join_element_wise(table.column("kind"), pc.cast(table.column("layer"), pa.string()), "")
    names = pc.coalesce(table.column("layer_name"), derived)
    return table.set_column(table.column_names.index("layer_name"), "layer_name", names)
