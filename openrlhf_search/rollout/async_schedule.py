"""Scheduling core of asynchronous rollouts: the staleness bound and partial-rollout version tagging (pure logic).

Nothing here runs a model or a thread. The same three objects drive ``benchmarks/async_rollout_sim.py`` (a
discrete-event simulation) and drive the local trainer's asynchronous producer
(:mod:`openrlhf_search.rollout.producer`, ``rollout.async_producer``).

Vocabulary. The learner publishes policy *versions* ``0, 1, 2, ...`` (version ``v`` = the weights after ``v``
optimiser updates). The scheduling unit is an *item* (a GRPO group of ``G`` trajectories of one prompt, so group
statistics are computed over samples that started together). Every item carries the *start tag*: the engine's
policy version when its first token was sampled, which is also the oldest version of any of its tokens. Its
*staleness* when the learner consumes it at version ``v`` is ``v - start_tag``.

:class:`StalenessBound` (the contract, for ``max_staleness = eta``, ``batch_size = B`` items per update):

* an item tagged ``t`` has the *deadline* ``t + eta``: it must be consumed at a learner version ``<= t + eta``.
  The learner consumes exactly ``B`` items per version, so the open (admitted, unconsumed) items are feasible iff
  for every deadline ``d >= v`` at most ``(d - v + 1) B`` of them are due by ``d`` (earliest-deadline-first
  scheduling of unit jobs, ``B`` per slot);
* admission: the producer may start an item only if the open items stay feasible with it. With an engine that is
  never behind the learner this is AReaL's rule ``started < (v + eta + 1) B`` (Fu et al. 2025, arXiv 2505.24298,
  section 5); a lagging engine (partial rollouts off: the update waits for a drain) is admitted less;
* batch formation at learner version ``v``: the ``B`` completed items with the oldest tags, but only if what remains
  is still feasible for the versions after ``v``; otherwise an older item is still running and the learner waits
  for it. Nothing is ever dropped (no bias against long trajectories) and ``staleness <= eta`` holds for every
  consumed item (asserted); an infeasible state (admission bypassed) raises :class:`StalenessError`;
* ``eta = 0`` is the synchronous loop: ``B`` items per version, the learner waits for all of them.

:class:`VersionedTrajectory` keeps, per response token, the policy version that sampled it and its behaviour
log-prob (a trajectory interrupted by a weight update continues under the new weights: a *partial rollout*).

:class:`WeightMailbox` is the learner -> engine hand-off: the learner posts a version, the engine takes it at a safe
point -- between turns (partial rollouts on) or only when no trajectory is in flight (partial rollouts off). A newer
post replaces an unapplied older one (the engine jumps to the latest weights).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class StalenessError(RuntimeError):
    """Raised when a caller breaks the staleness contract (a bug in the producer, never a user input)."""


@dataclass
class StalenessBound:
    """Admission control and batch formation that never exceed ``max_staleness`` (see the module docstring)."""

    batch_size: int
    """Items (GRPO groups) per learner update ``B``."""
    max_staleness: int = 0
    """``eta``: the largest ``learner_version - start_tag`` allowed for a consumed item (0 = synchronous)."""
    learner_version: int = 0
    """Version the learner has published (number of updates done)."""
    started: int = 0
    """Items admitted so far."""
    consumed: int = 0
    """Items handed to the learner so far (``learner_version * batch_size``)."""
    open_tags: Counter = field(default_factory=Counter)
    """Start tag -> number of admitted, not yet consumed items (running or finished)."""
    dropped: int = 0
    """Items released without being consumed (:meth:`drop`)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: expected >= 1")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness={self.max_staleness}: expected >= 0 (0 = synchronous)")

    @property
    def next_slot(self) -> int:
        """Learner version of the next batch to form (``learner_version + 1`` between a take and its publish)."""
        return self.consumed // self.batch_size

    # an item with tag t has the deadline t + eta: it must be consumed in the batch of a version <= t + eta
    def _violations(self, counts: Counter, slots_from: int) -> list[int]:
        """Deadlines d >= v where more than ``(d - v + slots_from) * B`` items of ``counts`` are due by d."""
        v, eta, bad, cum = self.next_slot, self.max_staleness, [], 0
        for d in sorted({t + eta for t in counts if counts[t] > 0}):
            cum += sum(c for t, c in counts.items() if t + eta == d)
            if d < v or cum > (d - v + slots_from) * self.batch_size:
                bad.append(d)
        return bad

    def can_start(self, engine_version: int | None = None) -> bool:
        """May the producer admit one more item, sampled with ``engine_version`` (default: the learner's)?

        True iff every deadline stays feasible with it: for each ``d``, at most ``(d - v + 1) B`` open items are due
        by ``d`` (one batch per version from now). For a non-lagging engine this is AReaL's ``started <
        (v + eta + 1) B``.
        """
        u = self.learner_version if engine_version is None else engine_version
        if u + self.max_staleness < self.next_slot:
            return False  # the engine's weights are already too old for any future batch
        trial = Counter(self.open_tags)
        trial[u] += 1
        return not self._violations(trial, 1)

    def start(self, engine_version: int | None = None) -> int:
        """Admit one item; returns its start tag. Raises :class:`StalenessError` if :meth:`can_start` is False."""
        u = self.learner_version if engine_version is None else engine_version
        if u > self.learner_version:
            raise StalenessError(f"engine version {u} is ahead of the learner's {self.learner_version}")
        if not self.can_start(u):
            raise StalenessError(f"admission refused: {sum(self.open_tags.values())} items open, engine version "
                                 f"{u}, learner version {self.learner_version}, max_staleness {self.max_staleness}, "
                                 f"batch {self.batch_size}")  # fmt: skip
        self.started += 1
        self.open_tags[u] += 1
        return u

    def staleness(self, start_tag: int) -> int:
        """``learner_version - start_tag``."""
        return self.learner_version - start_tag

    def take_batch(self, completed, allow_partial: bool = False):
        """Choose and consume the next batch, or return None if the learner must wait.

        Args:
            completed: ``(start_tag, key)`` of finished, not yet consumed items.
            allow_partial: take fewer than ``batch_size`` items (possibly none) if that is all there is; the
                version's ``batch_size`` slots are consumed all the same (dynamic filtering's cap: the batch stays
                partial). Still None while an open item is due at this version.
        Returns:
            The ``batch_size`` keys with the oldest tags (earliest deadlines; ties in the given order), or None when
            fewer are complete or taking them would leave an item that can no longer meet its deadline (an older
            item is still running: the learner waits for it).
        Raises:
            StalenessError: the open items are infeasible even if all finished (admission was bypassed).
        """
        if self.next_slot != self.learner_version:
            raise StalenessError("take_batch() twice without publish()")
        if self._violations(self.open_tags, 1):
            raise StalenessError(f"open items {dict(self.open_tags)} cannot all meet staleness "
                                 f"{self.max_staleness} at version {self.learner_version}: admission was bypassed")
        completed = list(completed)
        if len(completed) < self.batch_size and not allow_partial:
            return None
        done = sorted(enumerate(completed), key=lambda x: (x[1][0], x[0]))
        chosen = [item for _, item in done[: self.batch_size]]
        left = Counter(self.open_tags)
        for tag, key in chosen:
            if left[tag] <= 0:
                raise StalenessError(f"item {key!r} with tag {tag} was never admitted (or consumed twice)")
            left[tag] -= 1
        if self._violations(left, 0):
            return None
        for tag, key in chosen:
            if self.staleness(tag) > self.max_staleness:  # unreachable by construction; guards refactors
                raise StalenessError(f"item {key!r}: staleness {self.staleness(tag)} > {self.max_staleness}")
        self.open_tags = +left
        self.consumed += self.batch_size
        return [key for _, key in chosen]

    def drop(self, start_tag: int) -> None:
        """An admitted item will never be consumed (dynamic filtering rejected it): release its slot."""
        if self.open_tags[start_tag] <= 0:
            raise StalenessError(f"drop({start_tag}): no open item with that tag")
        self.open_tags[start_tag] -= 1
        self.open_tags = +self.open_tags
        self.dropped += 1

    def publish(self) -> int:
        """The learner finished the update on the batch it took; returns the new version."""
        if self.consumed != (self.learner_version + 1) * self.batch_size:
            raise StalenessError("publish() without a take_batch() for this version")
        self.learner_version += 1
        return self.learner_version


@dataclass
class VersionedTrajectory:
    """Response tokens of one trajectory with the policy version and behaviour log-prob of each model token."""

    token_ids: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    """Log-prob under the weights that sampled the token (0.0 on observation tokens)."""
    versions: list[int] = field(default_factory=list)
    """Policy version that sampled each token; ``-1`` on observation (retrieved) tokens."""

    def extend_generated(self, token_ids, logprobs, version: int) -> None:
        """Append model tokens sampled by ``version`` (one turn, or the part of a turn before/after an update)."""
        token_ids, logprobs = list(token_ids), list(logprobs)
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} log-probs")
        self.token_ids += token_ids
        self.behaviour_logprobs += [float(x) for x in logprobs]
        self.versions += [int(version)] * len(token_ids)

    def extend_observation(self, token_ids) -> None:
        """Append tokens the model did not sample (a retrieved passage): version -1, log-prob 0."""
        token_ids = list(token_ids)
        self.token_ids += token_ids
        self.behaviour_logprobs += [0.0] * len(token_ids)
        self.versions += [-1] * len(token_ids)

    @property
    def model_versions(self) -> list[int]:
        return [v for v in self.versions if v >= 0]

    @property
    def oldest_version(self) -> int | None:
        vs = self.model_versions
        return min(vs) if vs else None

    @property
    def newest_version(self) -> int | None:
        vs = self.model_versions
        return max(vs) if vs else None


@dataclass
class WeightMailbox:
    """Learner -> engine weight hand-off with the partial-rollout rule (see the module docstring)."""

    partial_rollouts: bool = True
    """True: apply at the next turn boundary (in-flight trajectories continue under the new weights);
    False: apply only when no trajectory is in flight (the producer stops admitting until then)."""
    engine_version: int = 0
    """Version the engine samples with."""
    pending: int | None = None
    """Posted, not yet applied version."""

    def post(self, version: int) -> None:
        if version <= self.engine_version or (self.pending is not None and version <= self.pending):
            raise StalenessError(f"posted version {version} is not newer than {self.pending or self.engine_version}")
        self.pending = version

    def blocks_admission(self) -> bool:
        """Without partial rollouts a pending update stops new trajectories (the engine drains)."""
        return self.pending is not None and not self.partial_rollouts

    def maybe_apply(self, in_flight: int) -> int | None:
        """Call at every safe point (turn boundary); returns the applied version or None."""
        if self.pending is None or (not self.partial_rollouts and in_flight > 0):
            return None
        self.engine_version, self.pending = self.pending, None
        return self.engine_version


def generate_turn(traj: VersionedTrajectory, generate, mailbox: WeightMailbox, in_flight: int = 1) -> int:
    """One model turn of a (possibly partial) rollout: apply a pending update at this turn boundary, then sample.

    ``generate(version) -> (token_ids, logprobs)`` samples with the engine's current weights; the tokens are tagged
    with that version. ``in_flight``: trajectories currently unfinished on the engine, this one included (without
    partial rollouts an update waits until it is 0; pass 0 at the start of a new trajectory after a drain).
    Returns the version that sampled the turn.
    """
    mailbox.maybe_apply(in_flight)
    version = mailbox.engine_version
    ids, logprobs = generate(version)
    traj.extend_generated(ids, logprobs, version)
    return version
