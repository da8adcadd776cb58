"""The recipe reference, read from the config dataclasses themselves: every field's dotted key, type,
default and help text. `python -m train recipe-help [SECTION]` prints it; docs/recipe-reference.md is
generated from it (`make docs`), and a test keeps the two equal."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from train.core.errors import UserError


@dataclass
class FieldDoc:
    key: str  # dotted, list items as `sources[]`
    type: str
    default: str
    help: str
    section: bool  # a nested section (its fields follow)


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "(required)"
    return "null" if value is None else repr(value)


def _item_class(tp: Any) -> type | None:
    """The dataclass inside `list[X]` or `X | None`, if any."""
    for candidate in (tp, *typing.get_args(tp)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _walk(cls: type, prefix: str) -> list[FieldDoc]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp, key = hints[f.name], f"{prefix}{f.name}"
        nested = _item_class(tp)
        is_list = typing.get_origin(tp) is list
        rows.append(FieldDoc(key, type_name(tp), _default(f), f.metadata.get("help", ""), nested is not None))
        if nested is not None:
            rows.extend(_walk(nested, f"{key}[]." if is_list else f"{key}."))
    return rows


def describe(cls: type, section: str | None = None) -> list[FieldDoc]:
    """Every field of `cls` (recursively), or of one section such as `training` or `data.dedup`."""
    rows = _walk(cls, "")
    if not section:
        return rows
    wanted = section.rstrip(".")
    picked = [r for r in rows if r.key == wanted or r.key.startswith(wanted + ".") or r.key.startswith(wanted + "[]")]
    if not picked:
        sections = sorted(r.key for r in rows if r.section)
        raise UserError(f"recipe-help: no section '{section}'; sections: {', '.join(sections)}")
    return picked


def format_text(rows: list[FieldDoc]) -> str:
    lines = []
    for r in rows:
        if r.section:
            lines.append(f"\n{r.key}  ({r.type})\n    {r.help}")
        else:
            lines.append(f"  {r.key}: {r.type} = {r.default}\n      {r.help}")
    return "\n".join(lines).lstrip("\n") + "\n"


def format_markdown(rows: list[FieldDoc]) -> str:
    out = [
        "# Recipe reference",
        "",
        "Every key a stage recipe accepts, generated from the config dataclasses (`train/core/config.py`) by",
        "`python -m train recipe-help --markdown` (`make docs`); a test keeps this page equal to the code.",
        "Unknown keys are refused with the closest valid name; `section.key=value` on the command line",
        "overrides any of them.",
        "",
    ]
    helps = {r.key: r.help for r in rows if r.section}
    current, seen = None, set()
    for r in rows:
        parent = r.key.rsplit(".", 1)[0] if "." in r.key else ""
        if r.section:
            continue  # its fields open a table under its own heading
        if parent != current:
            title = parent.removesuffix("[]") if parent.endswith("[]") else parent
            if parent:
                label = f"`{parent}`" + (" (each item)" if parent.endswith("[]") else "")
                out += ["", f"## {label}" + (" (continued)" if parent in seen else ""), ""]
                if parent not in seen and helps.get(title):
                    out += [helps[title], ""]
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
            current = parent
            seen.add(parent)
        cell = r.help.replace("|", "\\|").replace("\n", " ")
        typ, default = r.type.replace("|", "\\|"), r.default.replace("|", "\\|")
        out.append(f"| `{r.key}` | `{typ}` | `{default}` | {cell} |")
    return "\n".join(out) + "\n"
