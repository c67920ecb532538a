"""Data plumbing of the local trainer: the question files it reads and the question stream with an exact, resumable
position.

:class:`QuestionStream` walks a list of questions in epochs; each epoch is a permutation drawn from
``Random(seed + epoch)``. Its whole state is ``(epoch, position)`` plus a ``requeue`` list (questions handed out
but never trained on when the checkpoint was taken: the asynchronous producer's open groups), served first; so a
resumed run continues with exactly the questions that would have come next: nothing lost, nothing repeated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from openrlhf_search.data.formats import DatasetFormatError, limit_question_length, read_dataset
from openrlhf_search.trainer.config import TrainConfig


@dataclass
class QuestionStream:
    """An endless, epoch-shuffled, checkpointable stream over ``samples``."""

    samples: list
    seed: int = 0
    epoch: int = 0
    position: int = 0
    requeue: list = None
    """Indices into ``samples`` to serve before continuing the permutation (restored from a checkpoint)."""

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("QuestionStream: no training questions")
        self._perm = self._permutation(self.epoch)
        self.requeue = list(self.requeue or [])

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        return perm

    def take(self, k: int) -> list:
        """The next ``k`` questions (crossing epoch boundaries as needed)."""
        return [s for _, s in self.take_indexed(k)]

    def take_indexed(self, k: int) -> list[tuple[int, object]]:
        """The next ``k`` questions as ``(index into samples, sample)``: requeued ones first."""
        out = []
        for _ in range(k):
            if self.requeue:
                i = self.requeue.pop(0)
                out.append((i, self.samples[i]))
                continue
            if self.position >= len(self._perm):
                self.epoch += 1
                self.position = 0
                self._perm = self._permutation(self.epoch)
            i = self._perm[self.position]
            out.append((i, self.samples[i]))
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": len(self.samples),
                "requeue": list(self.requeue)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != len(self.samples):
            raise ValueError(f"QuestionStream: checkpoint was taken over {state.get('n')} questions, "
                             f"this run has {len(self.samples)} (different data config?)")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        requeue = [int(i) for i in state.get("requeue", [])]  # absent in checkpoints of synchronous runs
        if any(not 0 <= i < len(self.samples) for i in requeue):
            raise ValueError(f"QuestionStream: checkpoint requeues indices outside 0..{len(self.samples) - 1}")
        self.requeue = requeue
        self._perm = self._permutation(self.epoch)


def read_question_files(files: list[str], cfg: TrainConfig, field_name: str) -> list:
    """The questions of ``files`` with the question-length cap applied; data errors are ``DatasetFormatError``
    (one line naming file, line and field)."""
    out = []
    for f in files:
        try:
            samples = read_dataset(f)
        except FileNotFoundError as exc:
            raise DatasetFormatError(f"{field_name}: {exc}") from None
        except (KeyError, ValueError) as exc:
            if isinstance(exc, DatasetFormatError):
                raise
            raise DatasetFormatError(f"{field_name}: {exc}") from None
        samples, changed = limit_question_length(samples, str(f), cfg.data.max_question_chars,
                                                 cfg.data.long_questions)
        if changed:
            print(f"[openrlhf-search] {f}: {changed} question(s) over data.max_question_chars="
                  f"{cfg.data.max_question_chars} {cfg.data.long_questions.rstrip('e')}ed", flush=True)
        out += samples
    return out
