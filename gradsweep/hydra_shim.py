"""Every use of Hydra's and OmegaConf's private API, in one place, each with why no public API does it; and the one
override parser the rest of gradsweep calls.

Checked against hydra-core 1.3.2 to 1.3.8 and omegaconf 2.3 (``HYDRA_SUPPORTED``: pyproject.toml declares the same
range, and tests/test_hydra_shim.py checks both, and that no other module reaches into Hydra's or OmegaConf's
internals). Hydra is imported inside the functions: a module that imports this one does not pay for Hydra until it
uses it. Each private use below is marked "Private:" in its docstring.

One use lives outside: hydra_plugins/gradsweep_launcher/sweeper.py subclasses Hydra's ``BasicSweeper`` at import,
where Hydra's plugin scan of any app imports it, and such a module must not import gradsweep (``basic_sweeper``
here is the same class, for gradsweep's own code).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

HYDRA_SUPPORTED = ">=1.3.2,<1.4"


def overrides_parser(config_loader: Any = None) -> Any:
    """Hydra's public override parser (``parse_override`` for one line, ``parse_overrides`` for a list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(config_loader=config_loader)


def parse_overrides(lines: Sequence[str], config_loader: Any = None) -> list[Any]:
    """Command-line overrides as Hydra's ``Override`` objects; a bad line raises Hydra's own exception."""
    return overrides_parser(config_loader).parse_overrides(list(lines))


def args_parser() -> Any:
    """Hydra's command-line parser, so that gradsweep's checks read argv exactly as ``hydra.main`` will.
    Private (``hydra._internal.utils``): ``hydra.main`` builds it inside and exports it nowhere public."""
    # Private: see the docstring
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


def basic_sweeper() -> type:
    """Hydra's basic sweeper class, to subclass and to count jobs with (``split_arguments``). Private: Hydra ships
    it only in ``hydra._internal``; subclassing it keeps Hydra's own batching and multirun.yaml exactly."""
    # Private: see the docstring
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper


def basic_launcher(hydra_context: Any, task_function: Any, config: Any) -> Any:
    """Hydra's basic launcher, set up the way Hydra sets up any launcher, for task functions that are not
    gradsweep's. Private: Hydra exposes no public constructor for it (hydra/launcher=basic instantiates it)."""
    # Private: see the docstring
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher

    launcher = BasicLauncher()
    launcher.setup(hydra_context=hydra_context, task_function=task_function, config=config)
    return launcher


def override_dirname(task_overrides: Sequence[Any], exclude_keys: list[str], item_sep: str, kv_sep: str) -> str:
    """``hydra.job.override_dirname`` of these parsed task overrides. Private: Hydra computes it with this function
    and exports it nowhere public; calling it keeps a fast-composed job's directory name identical to Hydra's."""
    # Private: see the docstring
    from hydra._internal.config_loader_impl import get_overrides_dirname

    return get_overrides_dirname(list(task_overrides), exclude_keys, item_sep, kv_sep)


def value_text(value: Any) -> str:
    """An override value as Hydra prints it back (quoting, lists, intervals). Private: no public function does."""
    from hydra.core.override_parser.types import Override

    # Private: see the docstring
    return Override._get_value_element_as_str(value)


def job_exception(job_return: Any) -> BaseException:
    """A failed job's exception. Private: ``JobReturn.return_value`` raises it only after logging "Error executing
    job" for it; the attribute behind it is the one way to read it without that second line."""
    # Private: see the docstring
    return job_return._return_value


def schema_type(node: Any) -> Any:
    """A DictConfig node's structured schema type (None or dict when it has none). Private: OmegaConf has no public
    accessor; ``OmegaConf.get_type`` resolves the value, which is not what is asked."""
    # Private: see the docstring
    return node._metadata.object_type


def child_node(node: Any, key: Any) -> Any:
    """The node under ``key`` of a DictConfig or ListConfig, not its value. Private: OmegaConf's public accessors
    return values (resolved, or converted), and whether a node is an untyped ``AnyNode`` is only on the node."""
    # Private: see the docstring
    return node._get_node(key)
