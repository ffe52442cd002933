"""Frozen dataclasses as configuration schemas, filled from JSON/YAML mappings with strict checks.

Every configuration in edgebc (the preprocessing card, training and serving configs) is a frozen
dataclass. `from_mapping` fills one from a plain mapping and rejects unknown keys by name, naming
the file they came from, because a typo in a YAML key that is silently ignored on a cart means
the device runs with a default nobody chose.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from edgebc.errors import ConfigError

T = TypeVar("T")
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def look_up_option(value: str, choices: Iterable[str], what: str = "option") -> str:
    """Return `value` if it is one of `choices`, else raise naming the valid ones and a close match."""
    options = list(choices)
    if value in options:
        return value
    close = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"Unknown {what} {value!r}.{hint} Valid choices: {', '.join(options)}.")


def from_mapping(cls: type[T], data: Mapping[str, Any], source: str = "configuration") -> T:
    """Build dataclass `cls` from `data`, converting lists to tuples and nested mappings to dataclasses.

    Unknown keys raise ConfigError naming `source` and the key; values of the wrong kind raise
    ConfigError naming the field. The dataclass's own __post_init__ validates ranges.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping of keys to values, got {type(data).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{source}: unknown key {key!r} for {cls.__name__}.{hint} "
            f"Valid keys: {', '.join(fields)}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _convert(value, hints[name], f"{source}: {cls.__name__}.{name}")
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{source}: {exc}") from exc


def to_mapping(obj: Any) -> dict[str, Any]:
    """The JSON/YAML-ready mapping of a (nested) dataclass: tuples become lists."""
    return _plain(dataclasses.asdict(obj))


def apply_overrides(
    data: Mapping[str, Any], overrides: Sequence[str], source: str = "--set"
) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested mapping; values are parsed as YAML."""
    merged = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: expected key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: cannot parse the value in {item!r}: {exc}") from exc
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {key!r} goes through a value that is not a mapping")
        node[parts[-1]] = value
    return merged


def load_config(
    cls: type[T], path: str | Path | None, overrides: Sequence[str] = (), flags: str = "--set"
) -> T:
    """Fill `cls` from the YAML file at `path` (defaults when None), then dotted `overrides` on top.

    An error names where the wrong value came from: the file, or `flags` (the overrides)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration: {exc.strerror or exc}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: expected a mapping at the top level, got {type(data).__name__}"
            )
    for item in overrides:
        check_override_key(cls, item.partition("=")[0], item, flags)
    merged = apply_overrides(data, overrides)
    try:
        return from_mapping(cls, merged, source=source)
    except ConfigError:
        if not overrides or (path is not None and not _valid(cls, data)):
            raise  # the file (or the defaults) alone is already wrong: its name is right
    return from_mapping(cls, merged, source=flags)  # raises again, blaming the flags


def _valid(cls: type, data: Mapping[str, Any]) -> bool:
    try:
        from_mapping(cls, data)
    except ConfigError:
        return False
    return True


def check_override_key(cls: type, key: str, item: str, flags: str = "--set") -> None:
    """Refuse a `--set` key that `cls` does not have, blaming the flag (not the YAML file), and
    suggest the full dotted key: `--set epochs=3` finds `optim.epochs`."""
    node: Any = cls
    parts = key.split(".")
    for depth, part in enumerate(parts):
        held = node
        node = _dataclass_of(held)
        if node is None:
            if typing.get_origin(held) is dict or held is Any:
                return  # a mapping of free keys: from_mapping checks what lies below
            above = ".".join(parts[:depth])
            raise ConfigError(
                f"{flags} {item}: {above!r} is a single value, not a group of settings"
            )
        fields = {f.name: f for f in dataclasses.fields(node) if f.init}
        if part not in fields:
            break
        node = typing.get_type_hints(node)[part]
        if depth == key.count("."):
            return
    else:  # pragma: no cover - the loop returns or breaks
        return
    paths = dotted_keys(cls)
    parent, _, leaf = key.rpartition(".")
    siblings = [p for p in paths if p.rpartition(".")[0] == parent]
    same_leaf = [path for path in paths if path.rpartition(".")[2] == leaf]
    near = difflib.get_close_matches(leaf, [p.rpartition(".")[2] for p in siblings], 1, 0.6)
    close = same_leaf or [f"{parent}.{near[0]}" if parent else near[0] for _ in near[:1]]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"{flags} {item}: {cls.__name__} has no setting {key!r}.{hint} "
        f"Valid keys{f' under {parent}' if parent else ''}: {', '.join(siblings)}."
    )


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of `cls` in `--set` form: `optim.epochs`, `preprocess.size`, ..."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        path = f"{prefix}{field.name}"
        keys.append(path)
        nested = _dataclass_of(hints[field.name])
        if nested is not None:
            keys.extend(dotted_keys(nested, path + "."))
    return keys


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (also through `X | None`), else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [_dataclass_of(arg) for arg in typing.get_args(hint)]
        classes = [c for c in found if c is not None]
        return classes[0] if len(classes) == 1 else None
    return None


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _convert(value, candidate, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        return from_mapping(hint, value, source=where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_hint, value_hint = args or (str, Any)
        return {
            _convert(k, key_hint, where): _convert(v, value_hint, f"{where}.{k}")
            for k, v in value.items()
        }
    if origin is typing.Literal:
        if isinstance(value, bool) and ("off" if value is False else "on") in args:
            return "off" if value is False else "on"  # YAML 1.1 reads an unquoted off as false
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-3 as a string; it is a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
