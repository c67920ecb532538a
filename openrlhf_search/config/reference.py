"""Field reference of config dataclasses: name, type, default and docstring of every field.

The docstring of a field is the string literal that follows it in the class body (the project's convention).
``openrlhf-search config [SECTION]`` prints :func:`describe` as text and ``docs/trainer.md``'s reference table is
:func:`markdown_table` of the training config, so both read the same source.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any


@dataclass
class FieldDoc:
    """One field of a config section."""

    key: str
    """Dotted key (``optimizer.lr``)."""
    type: str
    """The annotation, as written for a reader (``int``, ``str | None``, ``list[str]``)."""
    default: Any
    """Default value (a list for tuples)."""
    doc: str
    """The field's docstring on one line."""


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal that follows each annotated field in the class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # a class built at run time has no source
        return {}
    body = ast.parse(source).body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def type_name(tp: Any) -> str:
    """A readable annotation: ``int``, ``str | None``, ``list[str]``, ``'a' | 'b'`` for a ``Literal``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def describe(cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[FieldDoc]:
    """Every leaf field of ``cls`` (sections expanded, depth first, in declaration order); ``skip``: field names
    of ``cls`` left out."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    instance = cls()
    out: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe(tp, f"{prefix}{f.name}.")
            continue
        default = getattr(instance, f.name)
        out.append(FieldDoc(f"{prefix}{f.name}", type_name(tp), list(default) if isinstance(default, tuple)
                            else default, docs.get(f.name, "")))  # fmt: skip
    return out


def render_text(rows: list[FieldDoc], width: int = 100) -> str:
    """Rows as text for a terminal: ``key: type = default`` then the wrapped docstring."""
    out = []
    for r in rows:
        out.append(f"{r.key}: {r.type} = {r.default!r}")
        out += textwrap.wrap(_plain_doc(r.doc), width, initial_indent="    ", subsequent_indent="    ") or [""]
    return "\n".join(out)


def _plain_doc(doc: str) -> str:
    """A docstring without reStructuredText markup (``code`` -> code, :class:`x.Y` -> x.Y)."""
    import re

    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return doc.replace("``", "")


def markdown_table(rows: list[FieldDoc]) -> list[str]:
    """Rows as the lines of a markdown table (header included)."""
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for r in rows:
        doc = r.doc.replace("|", "\\|")
        tp = r.type.replace("|", "\\|")
        out.append(f"| `{r.key}` | `{tp}` | `{r.default!r}` | {doc} |")
    return out
