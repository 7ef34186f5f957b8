"""Config errors as an operator reads them: msgspec's validation message turned round
so it leads with the key path, a named table (`[analyzers.NAME]`) found by name, and
the three common mistakes said plainly: a value outside a fixed set lists the set, a
missing key says "required", and an unknown key suggests the closest valid one.

Kept apart from the Struct tree (config.py): these functions take the type to walk as
an argument, so they import nothing from it."""

from __future__ import annotations

import difflib
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import msgspec

_AT = re.compile(r"^(.*) - at `\$(.*)`$", re.DOTALL)
_AT_KEY = re.compile(r"^(.*) - at `key` in `\$(.*)`$", re.DOTALL)
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_UNKNOWN = re.compile(r"^Object contains unknown field `(.+)`$")
_MISSING = re.compile(r"^Object missing required field `(.+)`$")


def explain(raw: Any, exc: msgspec.ValidationError, root: Any, prefix: str = "$") -> str:
    """One line for a failed `msgspec.convert(raw, type=root)`: `$.a.b: reason`."""
    text = str(exc)
    if match := _AT_KEY.match(text):
        return _bad_name(raw, root, _segments(match.group(2)), prefix) or f"{prefix}: {text}"
    match = _AT.match(text)  # at the root, msgspec names no path
    reason, segments = (match.group(1), _segments(match.group(2))) if match else (text, [])
    path = prefix + "".join(_show(s) for s in segments)
    if "[...]" in segments:  # an entry of a table of named tables: find which one
        return _in_entry(raw, root, segments, prefix) or f"{path}: {reason}"
    kind = _type_at(root, segments)
    if match := _UNKNOWN.match(reason):
        return f"{path}.{match.group(1)}: unknown key{_suggestion(match.group(1), kind)}"
    if match := _MISSING.match(reason):
        return f"{path}.{match.group(1)}: required"
    if reason.startswith("Invalid enum value") and get_origin(kind) is Literal:
        valid = ", ".join(_literal(v) for v in get_args(kind))
        got = _value_at(raw, segments)
        return f"{path}: expected one of {valid}, got {_literal(got)}"
    return f"{path}: {reason}"


def field_names(kind: Any) -> list[str]:
    """The keys a Struct type takes, in declaration order ([] for anything else)."""
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return list(kind.__struct_encode_fields__)
    return []


def _suggestion(key: str, kind: Any) -> str:
    """`; did you mean "max_tokens"?` for the closest valid key (difflib, else one
    that begins with the typo: `prompt` -> `prompt_per_mtok`), or else the valid keys."""
    names = field_names(kind)
    close = difflib.get_close_matches(key, names, n=1) or [n for n in names if n.startswith(key)]
    if close:
        return f'; did you mean "{close[0]}"?'
    return f"; valid keys: {', '.join(names)}" if names else ""


def _segments(path: str) -> list[str]:
    """`.a.b[...][0]` -> ["a", "b", "[...]", "0"]: field names, and list indexes or
    `[...]` (msgspec's word for some entry of a dict)."""
    out: list[str] = []
    for match in _SEGMENT.finditer(path):
        name, index = match.groups()
        out.append(name if name is not None else "[...]" if index == "..." else index)
    return out


def _show(segment: str) -> str:
    return f"[{segment}]" if segment.isdigit() else segment if segment == "[...]" else f".{segment}"


def _unwrap(kind: Any) -> Any:
    """The type under Annotated[...] and `X | None`."""
    while True:
        origin = get_origin(kind)
        if origin is Annotated:
            kind = get_args(kind)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(kind) if a is not type(None)]
            if len(members) != 1:
                return kind
            kind = members[0]
        else:
            return kind


def _type_at(root: Any, segments: list[str]) -> Any:
    """The declared type at a path inside `root` (None when the path leaves it)."""
    kind = _unwrap(root)
    for segment in segments:
        origin = get_origin(kind)
        if origin is dict:
            kind = get_args(kind)[1]
        elif origin is list:
            kind = get_args(kind)[0]
        elif segment in field_names(kind):
            hints = get_type_hints(kind, include_extras=True)
            attr = kind.__struct_fields__[kind.__struct_encode_fields__.index(segment)]
            kind = hints[attr]
        else:
            return None
        kind = _unwrap(kind)
    return kind


def _value_at(raw: Any, segments: list[str]) -> Any:
    for segment in segments:
        if isinstance(raw, dict):
            raw = raw.get(segment)
        elif isinstance(raw, list) and segment.isdigit() and int(segment) < len(raw):
            raw = raw[int(segment)]
        else:
            return None
    return raw


def _literal(value: Any) -> str:
    """A value as TOML (and JSON) write it: "json", 3, true."""
    try:
        return msgspec.json.encode(value).decode()
    except TypeError:
        return repr(value)


def _in_entry(raw: Any, root: Any, segments: list[str], prefix: str) -> str | None:
    """msgspec names a bad dict entry `[...]`; validate each entry alone to name it."""
    at = segments.index("[...]")
    table = _value_at(raw, segments[:at])
    entry_type = get_args(_type_at(root, segments[:at]))
    if not isinstance(table, dict) or len(entry_type) != 2:
        return None
    where = prefix + "".join(_show(s) for s in segments[:at])
    for name, value in table.items():
        try:
            msgspec.convert(value, type=entry_type[1])
        except msgspec.ValidationError as inner:
            return explain(value, inner, entry_type[1], f"{where}.{name}")
    return None


def _bad_name(raw: Any, root: Any, segments: list[str], prefix: str) -> str | None:
    """A table name outside the allowed characters: quote it, and why."""
    table = _value_at(raw, segments)
    key_type = get_args(_type_at(root, segments))
    if not isinstance(table, dict) or len(key_type) != 2:
        return None
    where = prefix + "".join(_show(s) for s in segments)
    for name in table:
        try:
            msgspec.convert(name, type=key_type[0])
        except msgspec.ValidationError as inner:
            return f"{where}: bad name {name!r}: {inner}"
    return None
