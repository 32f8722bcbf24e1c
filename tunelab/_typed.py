"""Build frozen dataclasses from plain mappings with type checks and one-line errors.

Shared by the trial configuration and the study spec: unknown keys are rejected (with a
"did you mean" hint), values are checked against the field annotations, and every error
names the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from tunelab.errors import InputError

T = TypeVar("T")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if origin is tuple:
        return f"list of {_type_name(get_args(annotation)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(get_args(annotation)[1])}"
    if annotation is type(None):
        return "null"
    if dataclasses.is_dataclass(annotation):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def convert(annotation: Any, value: Any, where: str) -> Any:
    """Check `value` against `annotation` and return it in the annotated form."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(option, value, where)
            except InputError:
                continue
        raise InputError(f"{where}: expected {_type_name(annotation)}, got {_describe(value)}")
    if origin is Literal:
        if value in get_args(annotation) and not isinstance(value, bool):
            return value
        raise InputError(
            f"{where}: expected one of {_type_name(annotation)}, got {_describe(value)}"
        )
    if origin is tuple:
        if isinstance(value, str) and get_args(annotation)[0] is str:
            value = [item.strip() for item in value.split(",") if item.strip()]  # "a,b" form
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise InputError(f"{where}: expected {_type_name(annotation)}, got {_describe(value)}")
        item_type = get_args(annotation)[0]
        return tuple(convert(item_type, item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise InputError(f"{where}: expected {_type_name(annotation)}, got {_describe(value)}")
        key_type, item_type = get_args(annotation)
        return {
            convert(key_type, k, where): convert(item_type, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise InputError(f"{where}: expected a mapping, got {_describe(value)}")
        return from_mapping(annotation, value, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-5" (no dot) as a string; accept what float() reads exactly.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {annotation!r} at {where}")
    raise InputError(f"{where}: expected {_type_name(annotation)}, got {_describe(value)}")


def from_mapping(cls: type[T], mapping: Mapping[str, Any], where: str) -> T:
    """Build dataclass `cls` from `mapping`; `where` prefixes error messages (file: key)."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in mapping.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise InputError(f"{_join(where, key)}: unknown key{hint}")
        factory = fields[key].default_factory
        if isinstance(value, Mapping) and factory is not dataclasses.MISSING:
            # A section given in part keeps the field's own defaults (the critic's learning
            # rate, the actor's dropout), not those of its class.
            value = {**to_mapping(factory()), **value}
        kwargs[key] = convert(hints[key], value, _join(where, key))
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InputError(f"{_join(where, missing[0])}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, InputError) as exc:
        raise InputError(f"{where}: {exc}") from None


def field_annotation(cls: type, dotted: str) -> Any:
    """The annotation of a dotted field of nested dataclasses; KeyError when there is none."""
    annotation: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(annotation):
            raise KeyError(dotted)
        hints = get_type_hints(annotation)
        if part not in hints:
            raise KeyError(dotted)
        annotation = hints[part]
    return annotation


def _join(where: str, key: str) -> str:
    if where.endswith(":"):
        return f"{where} {key}"
    return f"{where}.{key}"


def to_mapping(obj: Any) -> Any:
    """Inverse of from_mapping: plain dicts, lists and scalars, ready for JSON or YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_mapping(item) for item in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


def read_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON file holding a mapping; errors name the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else getattr(exc, "lineno", "?")
        problem = getattr(exc, "problem", None) or getattr(exc, "msg", None) or exc
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise InputError(f"{path}:{line}: not valid {kind} ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return data


def with_dotted(mapping: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a nested mapping with dotted keys ("ppo.kl_coef") set to the given values."""
    result = json.loads(json.dumps(mapping))
    for key, value in values.items():
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InputError(f"{key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def apply_overrides(mapping: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides (values parsed as YAML) to a nested mapping copy."""
    values = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise InputError(f"override {override!r}: expected dotted key=value")
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            values[key] = raw
    return with_dotted(mapping, values)
