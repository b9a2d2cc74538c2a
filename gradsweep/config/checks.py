"""The vocabulary of config checks: one-line :class:`~gradsweep.errors.ConfigError` for a bad key, value or type.

Every schema (``gradsweep.config.sections``, the tuner's ``TuneCfg`` among them) validates itself with these.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from gradsweep.errors import ConfigError

TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
              dict: "a config node (<key>.<name>=...)"}


def choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    """``value`` must be one of ``valid``."""
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; valid values: {', '.join(valid)}")


def check(key: str, value: Any, ok: bool, rule: str) -> None:
    """``ok`` must hold; ``rule`` says what a valid value is ("an integer >= 1")."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid; it must be {rule}")


def finite(x: Any) -> bool:
    """A finite number (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def bare_type(annotation: Any) -> tuple[Any, bool]:
    """A field's type without ``| None``, and whether it was optional (``int | None`` -> ``(int, True)``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    hint, optional = bare_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}=null is not valid; it must be {TYPE_WORDS[hint]}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}={value!r} is not valid; it must be {'null or ' if optional else ''}{TYPE_WORDS[hint]}")


@functools.cache
def field_hints(cls: type) -> tuple[dict[str, Any], list[str]]:
    """A schema's field types and names (resolving the annotations is slow; a sweep builds thousands of configs)."""
    return typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls)]
