"""Building a section's dataclass from a YAML mapping: each value checked against its field's type."""

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

from .errors import ConfigError

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where a float is wanted)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        structured = [a for a in inner if dataclasses.is_dataclass(a)]
        if structured and isinstance(value, dict):  # e.g. a validation prompt with settings of its own
            return _build(structured[0], value, key, problems)
        return _convert(value, inner[0], key, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: got {value!r}; allowed: {', '.join(repr(a) for a in args)}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: got {value!r} ({type(value).__name__}); expected a mapping, {{name: value}}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: got {value!r} ({type(value).__name__}); expected a list of {_type_name(args[0])}")
            return value
        return [_convert(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string; it is clearly a number
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        problems.append(f"{key}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
    return value


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from the mapping `raw`, appending every problem found to `problems`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'config'}: got {raw!r}; expected a mapping of keys to values")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            where = f" in {prefix}" if prefix else ""
            problems.append(f"{dotted}: unknown key; " + (f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
                            if close else f"valid keys{where}: {', '.join(names)}"))
            continue
        before = len(problems)
        converted = _convert(value, hints[key], dotted, problems)
        if len(problems) == before:  # keep only well-typed values, so range checks still run on them
            kwargs[key] = converted
    try:
        return cls(**kwargs)
    except ConfigError as error:
        problems.extend(error.problems)
        return cls()
