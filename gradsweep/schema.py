"""Names shared by the statistics (which compute them, with torch) and the tables (which store them, without)."""

from __future__ import annotations

LAYER_STATS = (
    "wgrad_norm",  # L2 norm of dL/dW (the layer's weight gradient, before clipping)
    "wgrad_rms",  # that norm / sqrt(number of entries)
    "wgrad_max",  # max |dL/dW|
    "wgrad_zero_frac",  # fraction of entries of dL/dW exactly 0
    "wgrad_nonfinite",  # count of NaN/Inf entries of dL/dW
    "hgrad_norm",  # L2 norm over the batch of dL/dh, h = the layer's output (pre-activation): the backpropagated signal
    "weight_norm",  # L2 norm of W before this step's update
    "update_ratio",  # |applied update of W| / |W| (after clipping, momentum, weight decay); NaN if no update
    "out_rms",  # RMS of the layer's output h over batch and units
    "act_rms",  # RMS of the block's activation output (hidden Linear rows only)
    "saturated_frac",  # sigmoid/tanh: fraction of (sample, unit) activations within 1e-2 of their bounds
    "dead_frac",  # ReLU family: fraction of units whose activation input is <= 0 for every sample
)
