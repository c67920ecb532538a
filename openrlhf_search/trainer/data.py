"""Data plumbing of the local trainer: the question stream with an exact, resumable position.

:class:`QuestionStream` walks a list of questions in epochs; each epoch is a permutation drawn from
``Random(seed + epoch)``. Its whole state is ``(epoch, position)``, so a resumed run continues with exactly the
question that would have come next: nothing lost, nothing repeated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class QuestionStream:
    """An endless, epoch-shuffled, checkpointable stream over ``samples``."""

    samples: list
    seed: int = 0
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("QuestionStream: no training questions")
        self._perm = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        return perm

    def take(self, k: int) -> list:
        """The next ``k`` questions (crossing epoch boundaries as needed)."""
        out = []
        for _ in range(k):
            if self.position >= len(self._perm):
                self.epoch += 1
                self.position = 0
                self._perm = self._permutation(self.epoch)
            out.append(self.samples[self._perm[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": len(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != len(self.samples):
            raise ValueError(f"QuestionStream: checkpoint was taken over {state.get('n')} questions, "
                             f"this run has {len(self.samples)} (different data config?)")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._perm = self._permutation(self.epoch)
