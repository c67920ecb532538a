"""The dataset row shared by every reader, the synthetic generator and the search environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class QASample:
    """One question with its golden answers (the FlashRAG row, plus the fields Search-R1 parquet carries)."""

    id: str
    """Stable row id (FlashRAG ``id``; Search-R1 ``extra_info.index`` when there is no id)."""
    question: str
    """The question text, without any prompt template."""
    golden_answers: list[str]
    """All accepted answers; rewards take the best match over them."""
    data_source: str = ""
    """Dataset name (Search-R1 ``data_source``, e.g. ``nq``, ``hotpotqa``, ``synthetic``)."""
    group_id: str | None = None
    """Rollout group key (GRPO groups); defaults to ``id`` when the environment builds groups."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything else (FlashRAG ``metadata``; the synthetic generator stores hops and supporting doc ids here)."""

    def to_flashrag(self) -> dict:
        """The FlashRAG jsonl row: ``{"id", "question", "golden_answers", "metadata"}``."""
        meta = dict(self.metadata)
        if self.data_source:
            meta.setdefault("data_source", self.data_source)
        return {
            "id": self.id,
            "question": self.question,
            "golden_answers": list(self.golden_answers),
            "metadata": meta,
        }

    @classmethod
    def coerce(cls, obj: QASample | Mapping, where: str = "sample") -> QASample:
        """Accept a ``QASample`` or a FlashRAG-like dict; raise a ``ValueError`` naming ``where`` otherwise."""
        if isinstance(obj, QASample):
            return obj
        if not isinstance(obj, Mapping):
            raise TypeError(f"{where}: expected a QASample or a dict, got {type(obj).__name__}")
        if "question" not in obj or not isinstance(obj["question"], str):
            raise ValueError(f"{where}: missing or non-string field 'question'")
        golds = obj.get("golden_answers", obj.get("answers", obj.get("answer")))
        if isinstance(golds, str):
            golds = [golds]
        if not isinstance(golds, (list, tuple)) or not all(isinstance(g, (str, int, float)) for g in golds):
            raise ValueError(f"{where}: field 'golden_answers' must be a list of strings, got {golds!r}")
        return cls(
            id=str(obj.get("id", "")),
            question=obj["question"],
            golden_answers=[str(g) for g in golds],
            data_source=str(obj.get("data_source", "")),
            group_id=None if obj.get("group_id") is None else str(obj["group_id"]),
            metadata=dict(obj.get("metadata") or {}),
        )
