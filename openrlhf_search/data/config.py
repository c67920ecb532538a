"""The ``data`` section of the training config: where the training and held-out questions come from.

Declared here, next to the readers and the synthetic generator it configures, and registered in
:data:`openrlhf_search.config.SECTIONS`; :class:`openrlhf_search.trainer.config.TrainConfig` embeds it. Imports only
the leaf ``config`` package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openrlhf_search.config import section


@section("data")
@dataclass
class DataConfig:
    """Training and held-out questions."""

    source: str = "synthetic"
    """``synthetic`` (the generated knowledge base and its questions) or ``files`` (``train_files``/``eval_files``)."""
    train_files: list[str] = field(default_factory=list)
    """FlashRAG jsonl or Search-R1 parquet files with training questions (``source=files``)."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out question files (``source=files``)."""
    num_entities: int = 60
    """Synthetic only: number of entities in the generated knowledge base."""
    two_hop_fraction: float = 0.4
    """Synthetic only: share of two-hop questions (person -> bridge entity -> answer) in each split."""
    num_train: int = 400
    """Synthetic only (or a cap for files): number of training questions."""
    num_eval: int = 64
    """Synthetic only (or a cap for files): number of held-out questions."""
    seed: int = 0
    """Seed of the synthetic generator and of the shuffling of training questions."""
    max_question_chars: int = 4000
    """Longest question accepted (characters; 0 = no limit): a question this long could never fit a rollout budget
    (a 1 MB question tried to allocate 68 GB); what happens to longer ones is ``long_questions``."""
    long_questions: str = "refuse"
    """Questions longer than ``max_question_chars``: ``refuse`` (a data error naming file and line, exit 2),
    ``truncate`` (cut to ``max_question_chars``, counted in the log) or ``skip`` (dropped, counted)."""
    train_questions: str = "all"
    """Which training questions RL samples: ``all``, or ``answerable``: only those whose golden answer appears in
    the passages the environment returns when the question itself is the query (the test ``sft.demonstrations:
    retrieved`` applies). On real data most questions are out of reach of one search; their groups all score 0 and
    carry no gradient, so ``answerable`` spends the rollouts where the reward can vary. Held-out questions are never
    filtered. The same selection is made by every backend."""
