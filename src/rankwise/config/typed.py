"""Typed conversion of plain YAML mappings into validated dataclasses.

Each dataclass field's annotation drives the conversion; unknown keys, wrong types and
impossible values raise :class:`~rankwise.errors.ConfigError` naming the dotted key. Numeric
strings such as ``1e-4`` (which PyYAML reads as strings) are accepted as floats.
A dataclass may define ``validate(self, path)`` for cross-field checks.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from rankwise.errors import ConfigError


def join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def did_you_mean(key: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_known_keys(data: Mapping[str, Any], allowed: typing.Iterable[str], path: str) -> None:
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            raise ConfigError(
                join(path, key),
                f"unknown key{did_you_mean(str(key), allowed)} (allowed: {', '.join(allowed)})",
            )


def from_mapping(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` (a mapping or None for all defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    removed = getattr(cls, "REMOVED_KEYS", {})
    for key in data:
        if key in removed:
            raise ConfigError(join(path, key), f"no longer accepted: {removed[key]}")
    check_known_keys(data, [f.name for f in fields], path)
    kwargs = {}
    for f in fields:
        key_path = join(path, f.name)
        if f.name in data:
            # a field may name its own converter (e.g. model.adapter: by its registered type)
            field_convert = f.metadata.get("convert")
            kwargs[f.name] = (field_convert(data[f.name], key_path) if field_convert
                              else convert(hints[f.name], data[f.name], key_path))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key_path, "required key is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` to annotation ``tp`` or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(args, value, path)
    if value is None:
        raise ConfigError(path, f"must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                path,
                f"invalid value {value!r}{did_you_mean(str(value), map(str, args))} "
                f"(choose from {', '.join(map(str, args))})",
            )
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return [convert(item_tp, v, join(path, i)) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): convert(val_tp, v, join(path, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, path)
    return _convert_scalar(tp, value, path)


def _convert_union(args: tuple[Any, ...], value: Any, path: str) -> Any:
    """The first non-None member of the union that accepts ``value``; None if the union allows
    it. When none accepts it, the error lists every member's message, in order."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return convert(arg, value, path)
        except ConfigError as exc:
            errors.append(exc.message)
    raise ConfigError(path, " / ".join(errors))


def _convert_scalar(tp: Any, value: Any, path: str) -> Any:
    """``bool``, ``int``, ``float`` or ``str`` from a non-None YAML scalar.

    bool is a subclass of int, so true/false is refused as a number; numeric strings (PyYAML
    reads ``1e-4`` as one) are accepted; an int field takes an integer-valued float as an int.
    """
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def require(cond: bool, path: str, message: str) -> None:
    """Raise ConfigError(path, message) unless ``cond``."""
    if not cond:
        raise ConfigError(path, message)


def to_plain(obj: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (for writing the resolved config)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def with_dotted_values(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the plain config dict with each dotted path of ``values`` set, in order.
    Sections on the way that the dict leaves out (at their defaults) or holds as a non-mapping
    are created as empty dicts."""
    out = copy.deepcopy(dict(config))
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out
