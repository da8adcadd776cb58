"""Typed configs from YAML: a mapping becomes nested dataclasses, checked field by field.

Every recipe-like file goes through here (stage recipes, classification recipes, CodeI/O specs):
types and Literal choices are checked, nested sections built, `section.key=value` overrides
applied, and an unknown key is refused with the closest valid name. Errors name the file and the
dotted key. (Written by hand: it is ~100 lines, and the libraries that do this, e.g. OmegaConf
structured configs, would add a dependency and still need our one-line error messages.)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from train.core.errors import UserError


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, origin_file: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, origin_file)
            except UserError as err:
                errors.append(str(err))
        if not errors:
            raise UserError(f"{origin_file}: '{where}' must not be null")
        # `lora: {...} | 'none'`: a mapping is meant as the section (its own error), a word as the choice.
        raise UserError(errors[0] if isinstance(value, dict) else errors[-1])
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise UserError(f"{origin_file}: '{where}' is {value!r}; allowed: {allowed}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build_section(tp, value, where, origin_file)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{origin_file}: '{where}' must be a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{where}[{i}]", origin_file) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{origin_file}: '{where}' must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}", origin_file) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads 2e-4 as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise UserError(f"{origin_file}: '{where}' must be {_type_name(tp)}, got {value!r}")
    return value


def build_section(cls: type, data: Any, where: str, origin_file: str):
    if not isinstance(data, dict):
        raise UserError(f"{origin_file}: '{where or 'recipe'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise UserError(f"{origin_file}: unknown key '{dotted}'{_closest(str(key), list(fields))}")
        kwargs[key] = _coerce(value, hints[key], dotted, origin_file)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        dotted = ", ".join(f"{where}.{m}" if where else m for m in missing)
        raise UserError(f"{origin_file}: missing required key '{dotted}'")
    return cls(**kwargs)


def _apply_override(data: dict, override: str, origin: str) -> None:
    if "=" not in override:
        raise UserError(f"override '{override}' must look like section.key=value (e.g. training.max_steps=10)")
    dotted, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{override}': '{part}' is not a section")
    node[parts[-1]] = value


def read_yaml(path: str | Path, what: str = "recipe") -> dict:
    """A YAML mapping from disk, with the file named in every error (recipes, classify recipes, specs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def build_config(cls: type, data: dict, origin: str, overrides: list[str] | None = None):
    """Any typed config from a mapping: overrides applied, unknown keys rejected with the closest name."""
    data = dict(data or {})
    for override in overrides or []:
        _apply_override(data, override, origin)
    return build_section(cls, data, "", origin)
