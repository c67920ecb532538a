"""Regenerate the configuration reference table of docs/trainer.md from the config dataclasses' field docstrings.

    python scripts/config_reference.py            # rewrite the table in place
    python scripts/config_reference.py --check    # exit 1 if the table is out of date (the test suite checks keys)

The table is the block of lines starting at ``| key | default | meaning |`` up to the next blank line.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"
HEADER = "| key | default | meaning |"


def field_docs(cls) -> dict[str, str]:
    """``{field: docstring}`` from the string literal that follows each annotated field in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def rows(cls, prefix: str = "") -> list[str]:
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    instance = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += rows(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = getattr(instance, f.name)
        default = list(default) if isinstance(default, tuple) else default
        doc = docs.get(f.name, "").replace("|", "\\|")
        out.append(f"| `{prefix}{f.name}` | `{default!r}` | {doc} |")
    return out


def main(argv: list[str]) -> int:
    from openrlhf_search.trainer.config import TrainConfig

    lines = DOC.read_text(encoding="utf-8").split("\n")
    start = lines.index(HEADER)
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    new = lines[: start + 2] + rows(TrainConfig) + lines[end:]
    if "--check" in argv:
        return 0 if new == lines else 1
    DOC.write_text("\n".join(new), encoding="utf-8")
    print(f"{DOC}: {len(new[start + 2 : start + 2 + len(rows(TrainConfig))])} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
