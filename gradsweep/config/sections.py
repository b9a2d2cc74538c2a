"""Config schemas: one dataclass per YAML group, validated on construction.

Hydra composes YAML from ``gradsweep/conf/``; ``gradsweep.sweep.compose.to_run_cfg`` converts the composed
``DictConfig`` once, at the entry point, into a :class:`RunCfg`. Nothing below the entry point sees a
``DictConfig``. Building a config reads no file: ``gradsweep.engine.arrays.bind_data`` binds data=arrays to its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gradsweep.config.checks import check, choice, coerce, field_hints, finite
from gradsweep.config.stats import StatsCfg
from gradsweep.errors import ConfigError, first_line  # noqa: F401  (importable from here, as before)

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "gelu", "selu", "identity")
NORMS = ("none", "batchnorm", "layernorm")
MODELS = ("mlp", "cnn", "resmlp", "custom")
MODULE_KEYS = {"name": "mlp", "net": None}  # the model keys of module-built nets, with the values the MLP keeps
INIT_SCHEMES = ("default", "xavier", "kaiming", "normal", "uniform", "orthogonal")
DISTRIBUTIONS = ("uniform", "normal")
FAN_MODES = ("fan_in", "fan_out")
NONLINEARITIES = ("linear", "sigmoid", "tanh", "relu", "leaky_relu", "selu")
OPTIMIZERS = ("sgd", "adam")
DTYPES = ("float32", "float64")
DATASETS = ("regression", "scaled", "digits", "gaussian", "arrays")
TASKS = ("auto", "regression", "classification")
# data=arrays' own keys with the values every other data keeps (and run_ids before they existed)
ARRAYS_KEYS = {"path": None, "target": None, "task": "auto", "digest": "", "scale_target": False}
LOSSES = ("auto", "mse", "cross_entropy", "projection")
NO_IMAGES = ("regression", "scaled", "gaussian")  # built-in data of plain features: no conv net on them
CLASSIFICATION = ("digits",)  # built-in data whose targets are class indices (data=arrays: data.task decides)
DIGITS_SIZE = 1797  # scikit-learn's bundled 8x8 digits
DIGITS_CLASSES = 10
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("auto", "eager", "compiled")


def is_classification(data: DataCfg) -> bool:
    """Whether the data's targets are class indices (cross_entropy): digits, or data=arrays with data.task so."""
    return data.name in CLASSIFICATION or (data.name == "arrays" and data.task == "classification")


def linear_dims(model: ModelCfg, in_dim: int, out_dim: int) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of each Linear layer of the MLP ``model`` describes, input side first."""
    dims = [in_dim] + [model.width] * model.depth + [out_dim]
    return list(zip(dims[:-1], dims[1:]))


PRELU_INIT = 0.25  # nn.PReLU's initial slope


@dataclass
class ModelCfg:
    """The network: the MLP (``depth`` blocks of Linear -> norm -> activation, then a Linear readout), a built-in
    module (cnn, resmlp: gradsweep.engine.nets, from the same keys) or your own module (custom: ``net``)."""

    depth: int = 10
    """Number of hidden blocks (the readout Linear comes on top, so depth + 1 Linear layers); cnn: conv layers;
    resmlp: residual blocks."""
    width: int = 10
    """Units per hidden block; cnn: channels per conv layer."""
    activation: str = "relu"
    """Activation after every hidden block; one of ACTIVATIONS."""
    residual: bool = False
    """Add each block's input to its output wherever the shapes match (hidden blocks)."""
    norm: str = "none"
    """Normalisation between Linear and activation: none, batchnorm (gamma=1, beta=0), layernorm (cnn: GroupNorm
    with one group, over channels and pixels; resmlp: the pre-norm of each block)."""
    name: str = "mlp"
    """mlp, cnn, resmlp (gradsweep.engine.nets) or custom (your module: ``net``)."""
    net: dict | None = None
    """custom: the module, in Hydra's instantiate convention: ``_target_`` (an nn.Module class or a function that
    returns one, importable from the working directory or PYTHONPATH) and its arguments, each sweepable
    (model.net.<arg>=a,b). ``in_dim`` and ``out_dim``, the data's sizes, are passed when the target takes them and
    they are not given."""

    def __post_init__(self) -> None:
        check("model.depth", self.depth, self.depth >= 1, "an integer >= 1")
        check("model.width", self.width, self.width >= 1, "an integer >= 1")
        choice("model.activation", self.activation, ACTIVATIONS)
        choice("model.norm", self.norm, NORMS)
        choice("model.name", self.name, MODELS)
        if self.name == "custom":
            target = (self.net or {}).get("_target_")
            if target in (None, "???"):
                raise ConfigError("model.net._target_ is required with model=custom: the module to build, as "
                                  "model.net._target_=<module>.<class or function>")
            check("model.net._target_", target, isinstance(target, str) and bool(target.strip()),
                  "the module to build, as model.net._target_=<module>.<class or function>")
        else:
            check("model.net", self.net, self.net is None, "null unless model=custom")


@dataclass
class InitCfg:
    """How every Linear layer is re-initialised right after it is created."""

    name: str = "default"
    """The preset's name (the ``init=`` group choice); recorded in the run table."""
    scheme: str = "default"
    """default (PyTorch's own Linear init, untouched), xavier, kaiming, normal, uniform, orthogonal."""
    distribution: str = "uniform"
    """xavier/kaiming: uniform or normal variant."""
    gain: float = 1.0
    """xavier/orthogonal: gain."""
    a: float = 0.0
    """kaiming: negative slope used in the gain (PyTorch's default 0)."""
    mode: str = "fan_in"
    """kaiming: fan_in or fan_out."""
    nonlinearity: str = "leaky_relu"
    """kaiming: nonlinearity for the gain (PyTorch's default leaky_relu, which with a=0 is ReLU's)."""
    mean: float = 0.0
    """normal: mean of the weights."""
    std: float = 0.01
    """normal: standard deviation of the weights."""
    bound: float = 0.05
    """uniform: weights drawn from U(-bound, bound)."""
    bias: float | None = None
    """null keeps PyTorch's default bias init (as the article does); a number fills every bias with it."""

    def __post_init__(self) -> None:
        choice("init.scheme", self.scheme, INIT_SCHEMES)
        choice("init.distribution", self.distribution, DISTRIBUTIONS)
        choice("init.mode", self.mode, FAN_MODES)
        choice("init.nonlinearity", self.nonlinearity, NONLINEARITIES)
        check("init.gain", self.gain, finite(self.gain) and self.gain > 0, "a finite number > 0")
        check("init.std", self.std, finite(self.std) and self.std >= 0, "a finite number >= 0")
        check("init.bound", self.bound, finite(self.bound) and self.bound >= 0, "a finite number >= 0")
        check("init.a", self.a, finite(self.a), "a finite number")
        check("init.mean", self.mean, finite(self.mean), "a finite number")
        check("init.bias", self.bias, self.bias is None or finite(self.bias), "null or a finite number")


@dataclass
class OptimCfg:
    """The optimiser, applied per run."""

    name: str = "sgd"
    """sgd or adam (semantics of torch.optim.SGD / torch.optim.Adam)."""
    lr: float = 0.01
    """Learning rate, > 0."""
    momentum: float = 0.0
    """SGD momentum in [0, 1)."""
    weight_decay: float = 0.0
    """L2 penalty added to the gradient (torch.optim semantics), >= 0."""
    beta1: float = 0.9
    """Adam: first-moment decay."""
    beta2: float = 0.999
    """Adam: second-moment decay."""
    eps: float = 1e-8
    """Adam: denominator epsilon."""

    def __post_init__(self) -> None:
        choice("optim.name", self.name, OPTIMIZERS)
        check("optim.lr", self.lr, finite(self.lr) and self.lr > 0, "a finite number > 0")
        check("optim.momentum", self.momentum, finite(self.momentum) and 0 <= self.momentum < 1, "in [0, 1)")
        check("optim.weight_decay", self.weight_decay, finite(self.weight_decay) and self.weight_decay >= 0,
               "a finite number >= 0")
        check("optim.beta1", self.beta1, finite(self.beta1) and 0 <= self.beta1 < 1, "in [0, 1)")
        check("optim.beta2", self.beta2, finite(self.beta2) and 0 <= self.beta2 < 1, "in [0, 1)")
        check("optim.eps", self.eps, finite(self.eps) and self.eps > 0, "a finite number > 0")


@dataclass
class TrainCfg:
    """The training loop."""

    steps: int = 500
    """Optimiser steps."""
    batch_size: int | None = None
    """null = full batch; else minibatches of this size, reshuffled every epoch, last partial batch dropped."""
    clip_norm: float | None = None
    """null = no clipping; else clip the total gradient norm like torch.nn.utils.clip_grad_norm_."""
    seed: int = 0
    """torch.manual_seed(seed) right before the layers are built; also seeds minibatch order."""
    log_every: int = 1
    """Record statistics every this many steps (step 0 and the last step always)."""
    dtype: str = "float32"
    """float32 or float64 arithmetic (parameters and data are drawn in float32 either way)."""

    def full_batch(self, n: int) -> bool:
        """Whether every step sees all ``n`` training points (no batch_size, or one at least n)."""
        return self.batch_size is None or self.batch_size >= n

    def __post_init__(self) -> None:
        check("train.steps", self.steps, self.steps >= 1, "an integer >= 1")
        check("train.batch_size", self.batch_size, self.batch_size is None or self.batch_size >= 1, "null or an integer >= 1")
        check("train.clip_norm", self.clip_norm, self.clip_norm is None or (finite(self.clip_norm) and self.clip_norm >= 0),
               "null or a finite number >= 0")
        check("train.log_every", self.log_every, self.log_every >= 1, "an integer >= 1")
        choice("train.dtype", self.dtype, DTYPES)


@dataclass
class DataCfg:
    """The training data (full-batch regression by default) and an optional held-out test set."""

    name: str = "regression"
    """regression: the article's 100 points; scaled: features whose scales differ by orders of magnitude;
    digits: scikit-learn's bundled handwritten digits (8x8, 10 classes), standardised; gaussian: N(0, I) inputs
    and targets, for theory probes; arrays: your own file (path)."""
    n_samples: int | None = 100
    """Number of training points (digits: at most 1797 - n_test; arrays: null, every row the test set leaves, is
    resolved to that number)."""
    n_test: int = 0
    """Held-out points for test_loss / test_accuracy (0: none). Generated data draws them after the training
    points, so the training points do not depend on it."""
    seed: int = 0
    """numpy seed of the data (the article's is 0); digits: the seed of the train/test shuffle."""
    noise: float = 0.5
    """Standard deviation of the target noise (regression, scaled)."""
    n_features: int = 1
    """Input features (regression: 1, as in the article; scaled)."""
    scale_min: float = 1.0
    """scaled: smallest feature scale."""
    scale_max: float = 1.0
    """scaled: largest feature scale (scales are log-spaced from scale_min to scale_max)."""
    in_dim: int = 16
    """gaussian: input dimension; every other data: set to its number of input features (what ${data.in_dim}
    reads, e.g. in a model.net argument)."""
    out_dim: int = 16
    """gaussian: output (target) dimension; every other data: set to its number of outputs (classes for
    classification)."""
    path: str | None = None
    """arrays: the file, relative to the working directory: .npz (arrays x, y and optionally x_test, y_test) or
    .csv / .parquet (the column data.target, every other column a numeric feature)."""
    target: str | None = None
    """arrays, .csv / .parquet: the target column."""
    task: str = "auto"
    """arrays: regression, classification, or auto: integer, boolean or text targets classify, floats regress.
    Stored resolved."""
    digest: str = ""
    """arrays: the first 16 hex digits of the file's sha256, set from the file (a run's run_id follows its data)."""
    scale_target: bool = False
    """arrays, regression: standardise the targets with the training rows' mean and std (data=arrays sets it true):
    losses are then in units of the target's variance, and predicting the mean scores 1 (baseline_loss). false
    keeps them as written. Stored false for classification, which has no target scale."""

    def __post_init__(self) -> None:
        choice("data.name", self.name, DATASETS)
        choice("data.task", self.task, TASKS)
        if self.name == "arrays":  # its file is read when the config is bound to it (gradsweep.engine.arrays.bind_data)
            if self.path is None:
                raise ConfigError("data.path is required with data=arrays: a .npz, .csv or .parquet file")
        else:
            for key, default in ARRAYS_KEYS.items():
                check(f"data.{key}", getattr(self, key), getattr(self, key) == default,
                      f"{default!r} unless data=arrays".replace("None", "null"))
        unbound = self.name == "arrays" and self.n_samples is None  # every row the test set leaves, once bound
        check("data.n_samples", self.n_samples, unbound or (self.n_samples is not None and self.n_samples >= 2),
               "an integer >= 2 (null only for data=arrays); one sample has no baseline loss to beat")
        check("data.n_test", self.n_test, self.n_test >= 0, "an integer >= 0")
        check("data.n_features", self.n_features, self.n_features >= 1, "an integer >= 1")
        check("data.in_dim", self.in_dim, self.in_dim >= 1, "an integer >= 1")
        check("data.out_dim", self.out_dim, self.out_dim >= 1, "an integer >= 1")
        check("data.noise", self.noise, finite(self.noise) and self.noise >= 0, "a finite number >= 0")
        check("data.scale_min", self.scale_min, finite(self.scale_min) and self.scale_min > 0, "a finite number > 0")
        check("data.scale_max", self.scale_max, finite(self.scale_max) and self.scale_max >= self.scale_min,
               "a finite number >= data.scale_min")
        if self.name == "regression":
            check("data.n_features", self.n_features, self.n_features == 1, "1 for data=regression (the article's data)")
        if self.name not in ("gaussian", "arrays"):  # the data's sizes, for ${data.in_dim} (arrays: from its file)
            self.in_dim, self.out_dim = builtin_dims(self.name, self.n_features)
        if self.name == "digits":
            check("data.n_test", self.n_test, self.n_test < DIGITS_SIZE, f"< {DIGITS_SIZE} for data=digits")
            check("data.n_samples", self.n_samples, self.n_samples <= DIGITS_SIZE - self.n_test,
                   f"<= {DIGITS_SIZE - self.n_test} for data=digits with data.n_test={self.n_test}")


def builtin_dims(name: str, n_features: int) -> tuple[int, int]:
    """(input features, outputs) of the built-in data ``name`` (regression, scaled, digits) with ``n_features``."""
    return (64, DIGITS_CLASSES) if name == "digits" else ((1 if name == "regression" else n_features), 1)


@dataclass
class VerdictCfg:
    """Thresholds of the verdicts (gradsweep.results.verdicts): on grad_ratio_log10 (log10 of |dL/dh| at the first Linear
    over the last), at step 0 and as its median over training, and on the final loss against the data's baseline."""

    vanish_below: float = -2.0
    """Below this the run's gradients are 'vanishing' (first layer gets < 1/100 of the last's signal)."""
    explode_above: float = 2.0
    """Above this the run's gradients are 'exploding'."""
    stall_margin: float = 0.01
    """'stalled' when final_loss >= (1 - stall_margin) * baseline_loss: no better than the trivial predictor."""

    def __post_init__(self) -> None:
        check("verdict.vanish_below", self.vanish_below, finite(self.vanish_below) and self.vanish_below < 0,
               "a finite number < 0")
        check("verdict.explode_above", self.explode_above, finite(self.explode_above) and self.explode_above > 0,
               "a finite number > 0")
        check("verdict.stall_margin", self.stall_margin, finite(self.stall_margin) and 0 <= self.stall_margin < 1,
               "a number >= 0 and < 1")


@dataclass
class RunCfg:
    """Everything one run needs."""

    model: ModelCfg = field(default_factory=ModelCfg)
    init: InitCfg = field(default_factory=InitCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    data: DataCfg = field(default_factory=DataCfg)
    verdict: VerdictCfg = field(default_factory=VerdictCfg)
    stats: StatsCfg = field(default_factory=StatsCfg)
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu or cuda."""
    engine: str = "auto"
    """eager | compiled (on the CPU the fused kernel, gradsweep.engine.kernels.fused, for nets without norm layers; else one
    torch.compile'd step per shape, gradsweep.engine.compiled) | auto (compiled where the fused kernel applies or compiling
    pays: see gradsweep.engine.compiled.resolve_engine). How a run is computed, not what: not part of its run_id."""
    quiet: bool = False
    """No progress bars."""
    loss: str = "auto"
    """mse | cross_entropy | projection (L = mean over the batch of g_b . f(x_b), g the data's fixed N(0, I)
    targets); auto: cross_entropy for classification data (digits), else mse. Stored resolved."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Top-level keys added with ``+key=value`` (e.g. a tag); recorded as columns."""

    def __post_init__(self) -> None:
        if self.data.name == "arrays" and not self.data.digest:  # its sizes and task are the file's: unknown yet
            raise ValueError("a data=arrays config is checked whole only once bound to its file: build it with "
                             "gradsweep.engine.arrays.bound_run_cfg")
        choice("device", self.device, DEVICES)
        choice("engine", self.engine, ENGINES)
        choice("loss", self.loss, LOSSES)
        classes = is_classification(self.data)
        if self.loss == "auto":
            self.loss = "cross_entropy" if classes else "mse"
        if classes != (self.loss == "cross_entropy"):
            valid = "cross_entropy" if classes else "mse, projection"
            raise ConfigError(f"loss={self.loss!r} is not valid with data={self.data.name}; valid values: auto, {valid}")
        if self.model.name == "cnn" and self.data.name in NO_IMAGES:
            raise ConfigError(f"model=cnn is not valid with data={self.data.name}: its {self.data.in_dim} feature(s) "
                              "have no image shape; valid data: digits (8x8), arrays with square images")
        if self.model.norm == "batchnorm":
            bs = self.train.batch_size or self.data.n_samples
            check("train.batch_size", self.train.batch_size, bs >= 2,
                   "null or >= 2 with model.norm=batchnorm (batch statistics)")
        if self.train.batch_size is not None:
            check("train.batch_size", self.train.batch_size, self.train.batch_size <= self.data.n_samples,
                   f"null or <= data.n_samples ({self.data.n_samples})")


SECTIONS: dict[str, type] = {
    "model": ModelCfg, "init": InitCfg, "optim": OptimCfg,
    "train": TrainCfg, "data": DataCfg, "verdict": VerdictCfg, "stats": StatsCfg,
}
TOP_LEVEL: dict[str, Any] = {"device": str, "engine": str, "quiet": bool, "loss": str}
# Top-level keys Hydra or the runner itself may add, never recorded as extra columns.
_IGNORED_TOP = {"hydra"}


def build_section(name: str, values: dict[str, Any]) -> Any:
    """Construct one section's dataclass from plain values, with one-line errors for bad keys or types."""
    cls = SECTIONS[name]
    hints, fields = field_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{name}.{key} is not a known key; valid keys: {', '.join(fields)}")
        kwargs[key] = coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def build_run_cfg(values: dict[str, Any], bind_data: Callable[[DataCfg], DataCfg] | None = None) -> RunCfg:
    """Build a validated :class:`RunCfg` from a plain nested dict (the resolved config, ``hydra`` removed).
    ``bind_data`` binds the data section to its file (data=arrays) before the sections are checked together:
    ``gradsweep.engine.arrays.bound_run_cfg`` passes it; without it a data=arrays config is refused."""
    sections = {}
    top = {}
    extra = {}
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}={value!r} is not valid; it must be a config group ({key}.<key>=...)")
            sections[key] = build_section(key, value)
        elif key in TOP_LEVEL:
            top[key] = coerce(key, value, TOP_LEVEL[key])
        elif key not in _IGNORED_TOP:
            if isinstance(value, (dict, list)):
                valid = ", ".join([*SECTIONS, *TOP_LEVEL])
                raise ConfigError(f"{key} is not a known key; valid keys: {valid} (or +name=<scalar> to tag runs)")
            extra[key] = value
    if bind_data is not None and "data" in sections:
        sections["data"] = bind_data(sections["data"])
    return RunCfg(**sections, **top, extra=extra)
