"""Dataset readers and writers: FlashRAG jsonl, Search-R1 parquet, Search-R1 corpus jsonl; a converter between them.

* **FlashRAG jsonl** (the format of the FlashRAG benchmark collection that Search-R1 evaluates on): one object per
  line, ``{"id": str, "question": str, "golden_answers": [str, ...], "metadata": {...}}`` (``metadata`` optional).
* **Search-R1 parquet** (what Search-R1's ``scripts/data_process/*.py`` write and its verl trainer reads): columns
  ``data_source`` (str), ``prompt`` (list of ``{"role", "content"}`` chat messages with the instructions and the
  question), ``ability``, ``reward_model = {"style": "rule", "ground_truth": {"target": [answers]}}``,
  ``extra_info = {"split", "index", ...}``; Search-R1's files also keep the source columns ``id``, ``question``,
  ``golden_answers``, and so do ours. When ``question`` is absent it is recovered from ``extra_info.question`` or
  from the last ``Question:`` line of the user message.
* **Corpus jsonl** (Search-R1's wiki-18 layout): ``{"id": str, "contents": "\\"Title\\"\\ntext"}``; rows with
  ``title`` and ``text`` fields instead are accepted and converted.

Every reader error is a :class:`DatasetFormatError` naming the file and the line (jsonl, 1-based) or row
(parquet, 0-based) and the field: invalid JSON, a line that is not UTF-8 (with the byte's column), a missing or
ill-typed field, an empty golden answer (it would give an empty answer EM 1), and a file
with no rows at all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from openrlhf_search.data.types import QASample
from openrlhf_search.env.templates import get_template
from openrlhf_search.retrieval.types import Document

__all__ = [
    "DatasetFormatError",
    "read_flashrag_jsonl",
    "write_flashrag_jsonl",
    "read_searchr1_parquet",
    "write_searchr1_parquet",
    "read_corpus_jsonl",
    "write_corpus_jsonl",
    "read_dataset",
    "read_qa_file",
    "limit_question_length",
    "write_dataset",
    "convert",
    "FORMATS",
]


class DatasetFormatError(ValueError):
    """A dataset file has a missing or ill-typed field; the message names the file, the row and the field."""


def _golds(value: Any, where: str, field: str) -> list[str]:
    if hasattr(value, "tolist"):  # numpy arrays from pandas-written parquet files
        value = value.tolist()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int, float)) for v in value):
        golds = [str(v) for v in value]
        for i, g in enumerate(golds):
            if not g.strip():
                raise DatasetFormatError(f"{where}: field '{field}' item {i} is empty ({g!r}): it would score an "
                                         "empty answer EM 1; remove it or fix the answer")
        return golds
    raise DatasetFormatError(f"{where}: field '{field}' must be a non-empty list of strings, got {value!r:.80}")


def _no_rows(path: Path) -> DatasetFormatError:
    return DatasetFormatError(f"{path}: the file holds no rows (empty dataset)")


def _jsonl_rows(path: Path) -> Iterable[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetFormatError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                         f"{exc.start + 1}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DatasetFormatError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_flashrag_jsonl(path: str | Path) -> list[QASample]:
    """Read a FlashRAG jsonl file (``id``, ``question``, ``golden_answers``, optional ``metadata``)."""
    path = Path(path)
    out = []
    for lineno, row in _jsonl_rows(path):
        where = f"{path}:{lineno}"
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise DatasetFormatError(f"{where}: field 'question' is missing or not a non-empty string")
        if "golden_answers" not in row:
            raise DatasetFormatError(f"{where}: field 'golden_answers' is missing")
        meta = row.get("metadata") or {}
        if not isinstance(meta, dict):
            raise DatasetFormatError(f"{where}: field 'metadata' must be an object, got {type(meta).__name__}")
        out.append(
            QASample(
                id=str(row.get("id", f"{path.stem}-{lineno}")),
                question=q,
                golden_answers=_golds(row["golden_answers"], where, "golden_answers"),
                data_source=str(row.get("data_source", meta.get("data_source", ""))),
                metadata=meta,
            )
        )
    if not out:
        raise _no_rows(path)
    return out


def write_flashrag_jsonl(samples: Iterable[QASample], path: str | Path) -> Path:
    """Write samples as FlashRAG jsonl rows; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_flashrag(), ensure_ascii=False) + "\n")
    return path


_QUESTION_LINE = re.compile(r"Question:\s*(.+?)\s*$", re.S)


def _question_from_prompt(prompt: Any) -> str | None:
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if isinstance(prompt, str):
        content = prompt
    elif isinstance(prompt, (list, tuple)) and prompt:
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        content = users[-1] if users else ""
    else:
        return None
    idx = content.rfind("Question:")
    if idx < 0:
        return None
    m = _QUESTION_LINE.match(content[idx:])
    return m.group(1).splitlines()[0].strip() if m else None


def read_searchr1_parquet(path: str | Path) -> list[QASample]:
    """Read a Search-R1 parquet file (see the module docstring for the columns)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several exception types for corrupt files
        raise DatasetFormatError(f"{path}: not a readable parquet file ({exc})") from None
    if not rows:
        raise _no_rows(path)
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        extra = row.get("extra_info") or {}
        q = row.get("question") or extra.get("question") or _question_from_prompt(row.get("prompt"))
        if not isinstance(q, str) or not q.strip():
            raise DatasetFormatError(
                f"{where}: no question (need a 'question' column, 'extra_info.question' or a 'prompt' whose user "
                "message contains 'Question: ...')"
            )
        rm = row.get("reward_model")
        if isinstance(rm, dict) and isinstance(rm.get("ground_truth"), dict) and "target" in rm["ground_truth"]:
            golds = _golds(rm["ground_truth"]["target"], where, "reward_model.ground_truth.target")
        elif row.get("golden_answers") is not None:
            golds = _golds(row["golden_answers"], where, "golden_answers")
        else:
            raise DatasetFormatError(f"{where}: field 'reward_model.ground_truth.target' is missing")
        sid = row.get("id")
        if sid is None:
            sid = f"{row.get('data_source') or path.stem}-{extra.get('index', i)}"
        meta = {k: v for k, v in extra.items() if k not in ("question", "metadata")}
        if isinstance(extra.get("metadata"), str):
            try:
                meta.update(json.loads(extra["metadata"]))
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(
                    f"{where}: field 'extra_info.metadata' is not valid JSON ({exc.msg})"
                ) from exc
        out.append(
            QASample(
                id=str(sid),
                question=q.strip(),
                golden_answers=golds,
                data_source=str(row.get("data_source") or ""),
                metadata=meta,
            )
        )
    return out


def write_searchr1_parquet(
    samples: Iterable[QASample], path: str | Path, split: str = "train", template: str = "search_r1"
) -> Path:
    """Write samples as a Search-R1 parquet file; ``prompt`` is the user message of our ``template``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tpl = get_template(template)
    rows = []
    for i, s in enumerate(samples):
        rows.append(
            {
                "id": s.id,
                "question": s.question,
                "golden_answers": list(s.golden_answers),
                "data_source": s.data_source or "unknown",
                "prompt": tpl.messages(s.question),
                "ability": "fact-reasoning",
                "reward_model": {"style": "rule", "ground_truth": {"target": list(s.golden_answers)}},
                # metadata as a JSON string: per-row dicts of mixed types do not fit one parquet struct schema.
                "extra_info": {"split": split, "index": i, "metadata": json.dumps(s.metadata, ensure_ascii=False)},
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_corpus_jsonl(path: str | Path) -> list[Document]:
    """Read a corpus jsonl (``id`` + ``contents``, or ``id`` + ``title`` + ``text``)."""
    path = Path(path)
    out = []
    for lineno, row in _jsonl_rows(path):
        where = f"{path}:{lineno}"
        if "id" not in row:
            raise DatasetFormatError(f"{where}: field 'id' is missing")
        if isinstance(row.get("contents"), str):
            contents = row["contents"]
        elif isinstance(row.get("text"), str):
            title = row.get("title")
            contents = f'"{title}"\n{row["text"]}' if title else row["text"]
        else:
            raise DatasetFormatError(f"{where}: field 'contents' (or 'text') is missing or not a string")
        out.append(Document(str(row["id"]), contents))
    return out


def write_corpus_jsonl(docs: Iterable[Document], path: str | Path) -> Path:
    """Write documents as Search-R1 corpus rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
    return path


FORMATS: dict[str, tuple[Callable[..., list[QASample]], Callable[..., Path]]] = {
    "flashrag": (read_flashrag_jsonl, write_flashrag_jsonl),
    "searchr1": (read_searchr1_parquet, write_searchr1_parquet),
}
"""QA dataset formats by name: ``(reader, writer)``."""


def infer_format(path: str | Path) -> str:
    """``flashrag`` for ``.jsonl``/``.json``, ``searchr1`` for ``.parquet``; else a ``ValueError`` naming the file."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "flashrag"
    if suffix == ".parquet":
        return "searchr1"
    raise ValueError(
        f"{path}: cannot infer the dataset format from the extension; pass it explicitly ({sorted(FORMATS)})"
    )


def _check(fmt: str) -> str:
    if fmt not in FORMATS:
        raise KeyError(f"unknown dataset format {fmt!r}; valid: {sorted(FORMATS)}")
    return fmt


def read_dataset(path: str | Path, fmt: str | None = None) -> list[QASample]:
    """Read a QA dataset; the format is inferred from the extension unless given."""
    return FORMATS[_check(fmt or infer_format(path))][0](path)


LONG_QUESTION_POLICIES = ("refuse", "truncate", "skip")
"""What :func:`limit_question_length` does with a question over the limit (``data.long_questions``)."""


def limit_question_length(samples: list[QASample], source: str, max_chars: int,
                          policy: str = "refuse") -> tuple[list[QASample], int]:
    """Apply the question-length cap; returns ``(samples, number truncated or skipped)``.

    A question longer than any rollout budget only costs memory (a 1 MB question asked the policy's forward pass
    for 68 GB): ``refuse`` raises a :class:`DatasetFormatError` naming ``source`` and the question's id and row,
    ``truncate`` cuts it to ``max_chars`` characters, ``skip`` drops it. ``max_chars <= 0`` disables the cap.
    """
    from dataclasses import replace

    if policy not in LONG_QUESTION_POLICIES:
        raise DatasetFormatError(f"data.long_questions={policy!r}: expected one of {LONG_QUESTION_POLICIES}")
    if max_chars <= 0:
        return samples, 0
    out, changed = [], 0
    for i, smp in enumerate(samples):
        if len(smp.question) <= max_chars:
            out.append(smp)
            continue
        if policy == "refuse":
            raise DatasetFormatError(
                f"{source}: question {smp.id!r} (row {i + 1}) has {len(smp.question)} characters > "
                f"data.max_question_chars={max_chars}; shorten it, or set data.long_questions=truncate or skip")
        changed += 1
        if policy == "truncate":
            out.append(replace(smp, question=smp.question[:max_chars]))
    return out, changed


read_qa_file = read_dataset
"""Alias of :func:`read_dataset` (the trainer's name for it)."""


def write_dataset(samples: Iterable[QASample], path: str | Path, fmt: str | None = None, **kwargs) -> Path:
    """Write a QA dataset; the format is inferred from the extension unless given."""
    return FORMATS[_check(fmt or infer_format(path))][1](samples, path, **kwargs)


def convert(src: str | Path, dst: str | Path, src_fmt: str | None = None, dst_fmt: str | None = None, **kwargs) -> int:
    """Convert a QA dataset between formats; returns the number of rows written."""
    samples = read_dataset(src, src_fmt)
    write_dataset(samples, dst, dst_fmt, **kwargs)
    return len(samples)
