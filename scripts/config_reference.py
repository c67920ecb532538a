"""Regenerate the configuration reference table of docs/trainer.md (``openrlhf-search config --markdown``).

    python scripts/config_reference.py            # rewrite the table in place
    python scripts/config_reference.py --check    # exit 1 if the table is out of date (the test suite checks it)

The table is the block of lines starting at ``| key | type | default | meaning |`` up to the next blank line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from openrlhf_search.trainer.cli_config import reference_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"
HEADERS = ("| key | type | default | meaning |", "| key | default | meaning |")


def regenerated(text: str) -> str:
    """``text`` (docs/trainer.md) with its reference table replaced by the current one."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line in HEADERS)
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join(lines[:start] + reference_table() + lines[end:])


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    new = regenerated(text)
    if "--check" in argv:
        return 0 if new == text else 1
    DOC.write_text(new, encoding="utf-8")
    print(f"{DOC}: {len(reference_table()) - 2} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
