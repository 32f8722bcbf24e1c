"""Build frozen dataclasses from plain mappings with type checks, collecting every error.

Shared by the trial configuration and the study spec. One validation pass finds every unknown
key (with a "did you mean" hint), every value of the wrong type or not finite, and every rule a
dataclass's `checks()` reports; `Problems.raise_if_any` then raises one InputError listing them,
one line each naming the file and the dotted key. Files are read as UTF-8 YAML or JSON with
their nesting depth, size and aliases bounded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from tunelab.errors import InputError

T = TypeVar("T")

MAX_DEPTH = 32  # nesting levels of a config or spec file
MAX_VALUES = 100_000  # values after expanding YAML aliases (a "billion laughs" file is refused)
_INT_LIMIT = 2**63  # ints beyond int64 are typos, and overflow float arithmetic downstream


Problem = tuple[str, str]  # (key within a dataclass, what is wrong), yielded by its checks()


class Invalid(ValueError):
    """The rules a dataclass instance breaks: (key relative to the instance, message) pairs."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{key}: {message}" if key else message
                                   for key, message in problems))  # fmt: skip
        self.problems = problems


def at_least(bound: int, instance: Any, *names: str) -> Iterator[Problem]:
    """A problem for each named field of `instance` below `bound`."""
    for name in names:
        if getattr(instance, name) < bound:
            yield name, f"must be >= {bound}, got {getattr(instance, name)}"


def positive(instance: Any, *names: str) -> Iterator[Problem]:
    """A problem for each named field of `instance` that is not > 0."""
    for name in names:
        if not getattr(instance, name) > 0:
            yield name, f"must be > 0, got {getattr(instance, name)}"


def enforce(instance: Any) -> None:
    """`__post_init__` of a checked dataclass: raise Invalid listing everything its `checks()`
    yields; `checks()` yields (field or dotted key, what is wrong) for each broken rule."""
    problems = list(instance.checks())
    if problems:
        raise Invalid(problems)


def printable(text: str) -> str:
    """`text` with control characters (a newline among them) escaped, as Python writes them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Problems:
    """Errors found by one validation pass, each a line "FILE: dotted.key: what was expected"."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        line = printable(f"{where} {message}" if where.endswith(":") else f"{where}: {message}")
        if line not in self.lines:
            self.lines.append(line)

    def __bool__(self) -> bool:
        return bool(self.lines)

    def raise_if_any(self, source: str) -> None:
        """One InputError: the single line, or `SOURCE: N errors` followed by one line each."""
        if len(self.lines) == 1:
            raise InputError(self.lines[0])
        if self.lines:
            body = "\n".join(f"  {line}" for line in self.lines)
            raise InputError(f"{source}: {len(self.lines)} errors\n{body}")


INVALID: Any = object()  # what convert returns for a value it reported


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
    if annotation is Any:
        return "value"
    if dataclasses.is_dataclass(annotation):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _non_finite(value: Any, where: str) -> Iterator[str]:
    """Dotted places of NaN or infinite numbers inside a plain value."""
    if isinstance(value, float) and not math.isfinite(value):
        yield where
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _non_finite(item, _join(where, str(key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{where}[{index}]")


def convert(annotation: Any, value: Any, where: str, problems: Problems | None = None) -> Any:
    """`value` in the annotated form. A mismatch is added to `problems` (and INVALID returned),
    or raised as InputError when no `problems` is given."""
    if problems is None:
        own = Problems()
        result = convert(annotation, value, where, own)
        own.raise_if_any(where.rstrip(":"))
        return result
    expected = f"expected {_type_name(annotation)}, got {_describe(value)}"
    origin = get_origin(annotation)
    if annotation is Any:
        for place in _non_finite(value, where):
            problems.add(place, "expected a finite number")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        specific = []  # an option that took the value's kind but not the value (nan, 2**70)
        for option in options:
            if option is not type(None):
                trial = Problems()
                result = convert(option, value, where, trial)
                if not trial:
                    return result
                mismatch = Problems()
                mismatch.add(where, f"expected {_type_name(option)}, got {_describe(value)}")
                if trial.lines != mismatch.lines:
                    specific.append(trial)
        if len(specific) == 1 or (len(options) == 2 and type(None) in options):
            problems.lines.extend((specific or [trial])[0].lines)
        else:
            problems.add(where, expected)
        return INVALID
    if origin is Literal:
        if value in get_args(annotation) and not isinstance(value, bool):
            return value
        problems.add(where, f"expected one of {_type_name(annotation)}, got {_describe(value)}")
        return INVALID
    if origin is tuple:
        if isinstance(value, str) and get_args(annotation)[0] is str:
            value = [item.strip() for item in value.split(",") if item.strip()]  # "a,b" form
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            problems.add(where, expected)
            return INVALID
        item_type = get_args(annotation)[0]
        items = [convert(item_type, item, f"{where}[{i}]", problems)
                 for i, item in enumerate(value)]  # fmt: skip
        return INVALID if any(item is INVALID for item in items) else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.add(where, expected)
            return INVALID
        key_type, item_type = get_args(annotation)
        result = {}
        for key, item in value.items():
            converted_key = convert(key_type, key, _join(where, str(key)), problems)
            result[converted_key] = convert(item_type, item, _join(where, str(key)), problems)
        return INVALID if INVALID in result or INVALID in result.values() else result
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            problems.add(where, f"expected a mapping, got {_describe(value)}")
            return INVALID
        return from_mapping(annotation, value, where, problems)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) < _INT_LIMIT:
                return value
            expected = f"expected an int of at most 19 digits, got {_describe(value)}"
    elif annotation is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value) if abs(value) < 2**1000 else math.inf
        elif isinstance(value, str):
            # YAML 1.1 reads "1e-5" (no dot) as a string; accept what float() reads exactly.
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if math.isfinite(number):
                return number
            expected = f"expected a finite number, got {_describe(value)}"
    elif annotation is str:
        if isinstance(value, str):
            if "\x00" not in value:
                return value
            expected = "expected text without NUL characters"
    else:
        raise TypeError(f"unsupported annotation {annotation!r} at {where}")
    problems.add(where, expected)
    return INVALID


def convert_fields(
    cls: type, mapping: Mapping[Any, Any], where: str, problems: Problems
) -> dict[str, Any]:
    """The fields of dataclass `cls` found valid in `mapping`; the rest go to `problems`."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in mapping.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            problems.add(_join(where, str(key)), f"unknown key{hint}")
            continue
        factory = fields[key].default_factory
        if isinstance(value, Mapping) and factory is not dataclasses.MISSING:
            # A section given in part keeps the field's own defaults (the critic's learning
            # rate, the actor's dropout), not those of its class.
            value = {**to_mapping(factory()), **value}
        converted = convert(hints[key], value, _join(where, key), problems)
        if converted is not INVALID:
            kwargs[key] = converted
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in mapping:
            problems.add(_join(where, name), "required key is missing")
    return kwargs


def from_mapping(
    cls: type[T], mapping: Mapping[Any, Any], where: str, problems: Problems | None = None
) -> T:
    """Build dataclass `cls` from `mapping`; `where` prefixes messages ("FILE:" or "FILE: key").
    With `problems`, errors are added there (INVALID returned); without, raised at once."""
    if problems is None:
        own = Problems()
        result = from_mapping(cls, mapping, where, own)
        own.raise_if_any(where.split(":")[0])
        return result
    before = len(problems.lines)
    kwargs = convert_fields(cls, mapping, where, problems)
    if len(problems.lines) > before:
        return INVALID  # the instance's own rules need every field
    return construct(cls, kwargs, where, problems)


def construct(cls: type[T], kwargs: dict[str, Any], where: str, problems: Problems) -> T:
    """cls(**kwargs) with the rules it breaks added to `problems` (INVALID returned)."""
    try:
        return cls(**kwargs)
    except Invalid as exc:
        for key, message in exc.problems:
            problems.add(_join(where, key) if key else where, message)
    except (ValueError, InputError) as exc:
        problems.add(where, str(exc))
    return INVALID


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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what would crash or mislead later: nesting deeper than
    MAX_DEPTH (PyYAML recurses), an alias inside the node it names (a cycle), repeated keys."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: set[str] = set()

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} refers to the node it is in (a cycle)",
                    event.start_mark,
                )  # fmt: skip
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
            )
        anchor = getattr(event, "anchor", None)
        self._depth += 1
        if anchor:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} appears twice", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML text -> plain values, with _Loader's limits (yaml.YAMLError when broken)."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _check_size(data: Any) -> str | None:
    """Why `data` is too deep or too large once aliases are expanded (None when it is not)."""
    stack, count = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return f"holds more than {MAX_VALUES:,} values (aliases expanded)"
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return None


def read_text(path: Path) -> str:
    """A text file's content as UTF-8; one-line errors for a missing or non-UTF-8 file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None


def read_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON file holding a mapping; errors name the file."""
    text = read_text(path)
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else parse_yaml(text)
    except yaml.reader.ReaderError as exc:  # a control character
        raise InputError(f"{path}: not valid YAML (character #x{exc.character:04x} at offset "
                         f"{exc.position} is not allowed)") from None  # fmt: skip
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else getattr(exc, "lineno", "?")
        problem = getattr(exc, "problem", None) or getattr(exc, "msg", None) or exc
        problem = str(problem).strip().splitlines()[0]
        raise InputError(f"{path}:{line}: not valid {kind} ({problem})") from None
    except RecursionError:  # json recurses per level
        raise InputError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    too_big = _check_size(data)
    if too_big:
        raise InputError(f"{path}: {too_big}")
    return data


def with_dotted(mapping: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a nested mapping with dotted keys ("ppo.kl_coef") set to the given values."""
    result = copy.deepcopy(mapping)
    for key, value in values.items():
        node = result
        parts = str(key).split(".")
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
            values[key] = parse_yaml(raw)
        except yaml.YAMLError:
            values[key] = raw
    return with_dotted(mapping, values)
