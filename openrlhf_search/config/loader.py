"""Load a typed dataclass tree from YAML plus dotted ``key=value`` overrides, reporting every problem at once.

The loader knows no schema: a caller passes the root dataclass (``TrainConfig`` for training) and, optionally, the
old spellings it still accepts (:class:`Rename`). Each problem names the key and where it was set (``file:line`` or
the override); unknown keys get the nearest valid one ("did you mean").

Values are type-checked against the dataclass annotations: a string where a number belongs is converted when it
parses (YAML 1.1 reads ``1e-6`` as the string ``'1e-6'``), a ``Literal`` lists its choices, nested dataclasses are
sections. A dataclass may check itself in ``__post_init__`` (a ``ValueError`` becomes a problem of its section).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from openrlhf_search.registry import did_you_mean

__all__ = ["ConfigError", "Rename", "LoadResult", "load_tree", "read_yaml", "tree_lines", "build_typed", "origin",
           "config_to_dict", "save_config", "parse_overrides", "raise_problems"]  # fmt: skip


class ConfigError(ValueError):
    """A configuration problem; the message names the key and its source (file or override)."""


@dataclass(frozen=True)
class Rename:
    """An old spelling still accepted: ``old`` (a dotted key) is read as ``new``, with a note saying so.

    ``values``: only these values of ``old`` move, mapped to the new value (other values stay under ``old``, which
    must then still be a valid key)."""

    old: str
    """The dotted key of older configs."""
    new: str
    """The dotted key it is read as."""
    values: Mapping[str, Any] | None = None
    """Old value -> new value, when only some values moved (None: every value moves unchanged)."""


class _Ctx:
    """Where each key came from (``file:line``, the override, or the built-in source), the problems and notes."""

    def __init__(self, source: str, lines: dict[str, str] | None = None) -> None:
        self.source = source
        self.lines: dict[str, str] = dict(lines or {})
        self.problems: list[str] = []
        self.notes: list[str] = []

    def where(self, key: str) -> str:
        return self.lines.get(key, self.source)

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where(key)}: {message}")


_BAD = object()


def _coerce(value: Any, tp: Any, key: str, ctx: _Ctx, hints: Mapping[str, str]) -> Any:
    """``value`` as type ``tp``, or :data:`_BAD` after recording the problem in ``ctx``."""
    origin_ = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            ctx.fail(key, f"'{key}' must be a mapping (section {tp.__name__}), got {value!r}")
            return _BAD
        return _build(tp, value, key + ".", ctx, hints)
    if origin_ is typing.Union or str(origin_) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key, ctx, hints)
    if origin_ is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = did_you_mean(str(value), [str(c) for c in choices])
            ctx.fail(key, f"'{key}' must be one of {list(choices)}, got {value!r}{hint}")
            return _BAD
        return value
    if origin_ in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        sub = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin_ is tuple and sub and Ellipsis not in typing.get_args(tp) and len(sub) != len(value):
            ctx.fail(key, f"'{key}' must have {len(sub)} elements, got {value!r}")
            return _BAD
        out = [_coerce(v, sub[min(i, len(sub) - 1)], key, ctx, hints) for i, v in enumerate(value)] if sub \
            else list(value)
        if any(v is _BAD for v in out):
            return _BAD
        return tuple(out) if origin_ is tuple else out
    if origin_ is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            ctx.fail(key, f"'{key}' must be a mapping, got {value!r}")
            return _BAD
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        ctx.fail(key, f"'{key}' must be a boolean, got {value!r}")
        return _BAD
    if tp in (int, float):
        return _number(value, tp, key, ctx)
    if tp is str:
        if isinstance(value, (dict, list)):
            ctx.fail(key, f"'{key}' must be a string, got {value!r}")
            return _BAD
        return "" if value is None else str(value)
    return value


def _number(value: Any, tp: type, key: str, ctx: _Ctx) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        ctx.fail(key, f"'{key}' must be {tp.__name__}, got {value!r}")
        return _BAD
    try:
        num = float(value) if tp is float else int(value)
    except ValueError:
        num = _BAD
        if tp is int and isinstance(value, str):  # '1e3' in YAML 1.1 -> 1000 when it is a whole number
            try:
                f = float(value)
                num = int(f) if f.is_integer() else _BAD
            except ValueError:
                pass
        if num is _BAD:
            ctx.fail(key, f"'{key}' must be {tp.__name__}, got {value!r}")
            return _BAD
    if tp is int and isinstance(value, float) and value != num:
        ctx.fail(key, f"'{key}' must be an integer, got {value!r}")
        return _BAD
    return num


def _build(cls, data: dict, prefix: str, ctx: _Ctx, hints: Mapping[str, str]):
    types = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            where = prefix.rstrip(".") or "the top level"
            ctx.fail(key, f"unknown key '{key}'{did_you_mean(str(k), names)} (valid keys in {where}: "
                          f"{', '.join(sorted(names))}){hints.get(key, '')}")  # fmt: skip
            continue
        value = _coerce(v, types[k], key, ctx, hints)
        if value is not _BAD:
            kwargs[k] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a section's own check (__post_init__)
        ctx.fail(prefix.rstrip("."), f"{prefix.rstrip('.') or 'config'}: {exc}")
        return _BAD


def _set_dotted(root: type, tree: dict, dotted: str, value: Any, ctx: _Ctx, extra: Mapping[str, type]) -> None:
    cls, node, parts = root, tree, dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if i == 0 and part not in names and part in extra:
            sub: Any = extra[part]
        elif part not in names:
            where = ".".join(parts[:i]) or "the top level"
            ctx.fail(dotted, f"unknown key '{dotted}' ('{part}' is not a field of {where}"
                             f"{did_you_mean(part, names)}; valid: {', '.join(sorted(names))})")  # fmt: skip
            return
        else:
            sub = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(sub):
            ctx.fail(dotted, f"'{'.'.join(parts[: i + 1])}' is not a section, cannot set '{dotted}'")
            return
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node, cls = child, sub


def _record_keys(tree: dict, prefix: str, where: str, lines: dict[str, str]) -> None:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        lines.setdefault(key, where)
        if isinstance(v, dict):
            _record_keys(v, key + ".", where, lines)


def parse_overrides(overrides: list[str] | None) -> tuple[list[tuple[str, Any, str]], list[str]]:
    """``([(dotted key, YAML-parsed value, the override text)], [problems])`` of ``key=value`` overrides; an item
    without ``=`` is one problem naming it (never an exception)."""
    import yaml

    out, problems = [], []
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            problems.append(f"override '{item}': expected section.key=value (e.g. steps=40)")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value, item))
    return out, problems


def _pop_dotted(tree: dict, dotted: str) -> tuple[bool, Any]:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    if parts[-1] not in node:
        return False, None
    return True, node[parts[-1]]


def _apply_renames(tree: dict, renames: list[Rename], ctx: _Ctx) -> None:
    """Move old keys of the file tree to their new place (a note each; the new key keeps the old one's line)."""
    for r in renames:
        found, value = _pop_dotted(tree, r.old)
        if not found or (r.values is not None and not isinstance(value, str | int | float | bool)):
            continue
        if r.values is not None and value not in r.values:
            continue
        new_value = value if r.values is None else r.values[value]
        parent = tree
        for part in r.old.split(".")[:-1]:
            parent = parent[part]
        del parent[r.old.split(".")[-1]]
        node = tree
        for part in r.new.split(".")[:-1]:
            child = node.get(part)
            node = node.setdefault(part, {}) if isinstance(child, dict) or child is None else node
        node.setdefault(r.new.split(".")[-1], new_value)
        where = ctx.where(r.old)
        ctx.lines.setdefault(r.new, where)
        ctx.notes.append(f"{where}: '{r.old}: {value}' is an old spelling, read as '{r.new}: {new_value}' "
                         "(write it so)")  # fmt: skip


def _renamed(key: str, value: Any, renames: list[Rename], ctx: _Ctx, item: str) -> tuple[str, Any]:
    for r in renames:
        if key == r.old and (r.values is None or (isinstance(value, str | int | float | bool) and value in r.values)):
            new_value = value if r.values is None else r.values[value]
            ctx.notes.append(f"override '{item}': '{r.old}' is an old spelling, read as '{r.new}={new_value}'")
            return r.new, new_value
    return key, value


@dataclass
class LoadResult:
    """What :func:`load_tree` found: the typed tree (None when even the valid keys cannot build it), the problems
    (one line each, with their source), notes on old spellings, and where each given key came from."""

    config: Any
    problems: list[str]
    notes: list[str]
    origin: dict[str, str]


def load_tree(root: type, tree: dict, lines: dict[str, str], source: str, overrides: list[str] | None = None,
              renames: list[Rename] | None = None, extra_sections: Mapping[str, type] | None = None,
              extra_field: str = "", hints: Mapping[str, str] | None = None) -> LoadResult:
    """Build ``root`` from ``tree`` (``lines``: dotted key -> ``file:line``) plus ``overrides``; never raises for a
    problem of the input, it is reported in the result.

    ``extra_sections``: top-level keys that are not fields of ``root`` but name a registered section (a plugin's);
    they are built as that dataclass and stored in the ``dict`` field ``extra_field`` of ``root``.
    ``hints``: an extra sentence for the unknown-key message of a dotted key (keys of older layouts).
    """
    renames, extra, hints = list(renames or []), dict(extra_sections or {}), dict(hints or {})
    tree = copy.deepcopy(tree)
    ctx = _Ctx(source, lines)
    _apply_renames(tree, renames, ctx)
    parsed, ctx.problems[:0] = parse_overrides(overrides)
    for key, value, item in parsed:
        key, value = _renamed(key, value, renames, ctx, item)
        ctx.lines[key] = f"override '{item}'"
        if isinstance(value, dict):
            _record_keys(value, key + ".", f"override '{item}'", ctx.lines)
        _set_dotted(root, tree, key, value, ctx, extra)
    names = {f.name for f in dataclasses.fields(root)}
    built_extra = {}
    for name in [k for k in tree if k not in names and k in extra]:
        value = _coerce(tree.pop(name), extra[name], name, ctx, hints)
        if value is not _BAD:
            built_extra[name] = value
    cfg = _build(root, tree, "", ctx, hints)
    if cfg is _BAD:
        return LoadResult(None, ctx.problems, ctx.notes, ctx.lines)
    if extra_field and built_extra:
        getattr(cfg, extra_field).update(built_extra)
    cfg._origin = ctx.lines  # where each given key came from (file:line / override), for later messages
    return LoadResult(cfg, ctx.problems, ctx.notes, ctx.lines)


class _MarkedDict(dict):
    """A YAML mapping that remembers the line of each key."""

    lines: dict


def _marked_loader():
    import yaml

    class MarkedLoader(yaml.SafeLoader):
        """SafeLoader whose mappings keep the source line of every key (for ``file:line`` messages)."""

    def construct_map(loader, node):
        data = _MarkedDict()
        yield data
        loader.flatten_mapping(node)
        data.update(loader.construct_mapping(node))
        data.lines = {loader.construct_object(k): k.start_mark.line + 1 for k, _ in node.value}

    MarkedLoader.add_constructor("tag:yaml.org,2002:map", construct_map)
    return MarkedLoader


def _plain(tree: Any, prefix: str, path: str, lines: dict[str, str]) -> Any:
    if isinstance(tree, dict):
        marks = getattr(tree, "lines", {})
        out = {}
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if k in marks:
                lines[key] = f"{path}:{marks[k]}"
            out[k] = _plain(v, key + ".", path, lines)
        return out
    if isinstance(tree, list):
        return [_plain(v, prefix, path, lines) for v in tree]
    return tree


def read_yaml(path: str | Path) -> tuple[dict, dict[str, str]]:
    """``(tree, lines)`` of a YAML config file: plain nested dicts, and ``dotted key -> "file:line"``.

    Raises:
        ConfigError: missing file, invalid YAML (with its line), or a top level that is not a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_marked_loader()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    lines: dict[str, str] = {}
    return _plain(loaded, "", str(p), lines), lines


def tree_lines(tree: dict, source: str) -> dict[str, str]:
    """``dotted key -> source`` for every key of an in-memory tree (a built-in config)."""
    lines: dict[str, str] = {}
    _record_keys(tree, "", source, lines)
    return lines


def build_typed(cls, data: dict, source: str, prefix: str = ""):
    """A dataclass ``cls`` from a mapping with the loader's type checks (for the transport views: agent, patch and
    Megatron JSON); raises :class:`ConfigError` (a ``ValueError``) naming ``source`` and every bad key."""
    ctx = _Ctx(source)
    obj = _build(cls, dict(data), prefix, ctx, {})
    if ctx.problems:
        raise ConfigError("; ".join(ctx.problems))
    return obj


def raise_problems(problems: list[str]) -> None:
    """Raise one :class:`ConfigError` listing ``problems`` (nothing when empty)."""
    if problems:
        raise ConfigError("\n  ".join([f"{len(problems)} config problem(s):", *problems]) if len(problems) > 1
                          else problems[0])  # fmt: skip


def origin(cfg: Any, key: str) -> str:
    """Where the dotted ``key`` of a loaded config was set (``file:line``, the override), or ``""`` (a default)."""
    return getattr(cfg, "_origin", {}).get(key, "")


def config_to_dict(cfg: Any) -> dict:
    """A plain (YAML/JSON-serialisable) dict of a config dataclass."""

    def fix(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: fix(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (tuple, list)):
            return [fix(v) for v in x]
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return x

    return fix(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML (what the run actually used)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")

