"""Configuration from environment variables, read one way by the orchestrator and both servers.

A settings class is a frozen dataclass whose fields name their variables (`setting("SANDBOX_MAX", 32)`); `read`
builds it from an environment, parsing each value by the field's type, and reports every bad value at once, by
name, with what is expected, in one `ConfigError`. An empty value, or a `${…}` placeholder that a client passed
through unexpanded from mcp.json, counts as unset.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Check = Callable[[Any], str | None]  # what is wrong with a parsed value, or None
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """Some variables hold values that cannot be used; the message names each and says what it must be."""


def setting(env: str, default: Any = dataclasses.MISSING, *, default_factory: Callable[[], Any] | None = None,
            check: Check | None = None, parse: Callable[[str], Any] | None = None, repr: bool = True) -> Any:
    """A dataclass field read from the variable `env`; `parse` replaces the type's own parsing."""
    meta = {"env": env, "check": check, "parse": parse}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta, repr=repr)
    return dataclasses.field(default=default, metadata=meta, repr=repr)


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be {low:g} or more"


def between(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must be between {low:g} and {high:g}"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def given(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None when it is unset, empty or an unexpanded placeholder."""
    value = env.get(name)
    if value is None or not value.strip() or (value.startswith("${") and value.endswith("}")):
        return None
    return value.strip()


def _parse(kind: Any, raw: str) -> Any:
    """`raw` as a value of the annotation `kind`; ValueError with what is expected."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind is bool:
        if raw.lower() in TRUE | FALSE:
            return raw.lower() in TRUE
        raise ValueError("expected 1 or 0 (or true, false)")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected a whole number") from None
    if kind is float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    if kind is Path:
        return Path(raw).expanduser()
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        separator = ":" if item is Path else ","
        return tuple(_parse(item, part.strip()) for part in raw.split(separator) if part.strip())
    if kind is str:
        return raw
    raise TypeError(f"settings of type {kind!r} are not supported")


def read(cls: type[T], env: Mapping[str, str]) -> T:
    """An instance of the settings class `cls` from `env`, or a `ConfigError` naming every bad variable."""
    errors: list[str] = []
    value = _read(cls, env, errors)
    if errors:
        raise ConfigError("bad configuration: " + "; ".join(errors))
    return value


def _read(cls: type[T], env: Mapping[str, str], errors: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind) and "env" not in f.metadata:
            values[f.name] = _read(kind, env, errors)
            continue
        name = f.metadata.get("env")
        raw = given(env, name) if name else None
        if raw is None:
            continue
        shown = f"{name}={raw[:60]!r}" if f.repr else name  # a secret's value is never repeated
        try:
            value = (f.metadata["parse"] or (lambda text: _parse(kind, text)))(raw)
        except (ValueError, OSError) as exc:
            errors.append(f"{shown}: {exc}")
            continue
        problem = f.metadata["check"](value) if f.metadata.get("check") else None
        if problem:
            errors.append(f"{shown}: {problem}")
            continue
        values[f.name] = value
    return cls(**values)
