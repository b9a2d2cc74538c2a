"""What the engine records of every layer at every logged step: the statistics' names, in the order of the
trace's last axis (``GroupTrace.layer``) and of the steps table's columns. No torch here, so that the results'
schema reads them without importing it."""

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
