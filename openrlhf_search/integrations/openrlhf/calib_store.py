"""A side channel carrying CalibAdv's per-turn records from the vLLM rollout actors to OpenRLHF's trainer.

Why it exists: OpenRLHF 0.11.2 turns an agent's ``extra_logs`` into one scalar tensor per key
(``samples_generator._process_response_into_experience``), so a variable-length list of search turns with their
document ids cannot travel inside the experience. The agent therefore publishes each trajectory's record under a
random integer id, sends only that id through ``extra_logs["calib_id"]`` (an int64 scalar survives exactly), and the
patched experience maker (:mod:`.patches`) collects the records by id.

Transport: a named, CPU-only Ray actor (:data:`STORE_NAME`) created on first use by whichever process needs it
(it lives as long as that process, i.e. the run); all actors of one OpenRLHF job share its namespace. Without Ray
(unit and contract tests) a process-local dict is used.
Records of trajectories that OpenRLHF drops (dynamic filtering) are evicted first-in first-out beyond
:data:`MAX_RECORDS`.
"""

from __future__ import annotations

import random
from collections import OrderedDict

STORE_NAME = "openrlhf_search_calib_store"
"""Name of the Ray actor holding the records."""
MAX_RECORDS = 200_000
"""Records kept at most (oldest evicted first): bounds memory when filtered trajectories are never collected."""
CALIB_ID_KEY = "calib_id"
"""The ``extra_logs`` / ``experience.info`` key carrying a trajectory's record id."""


class _Records:
    """An insertion-ordered, bounded id -> record dict (the state of the store, Ray or local)."""

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self.max_records = max_records
        self.items: OrderedDict[int, dict] = OrderedDict()

    def put(self, record_id: int, record: dict) -> None:
        """Store ``record`` under ``record_id``, evicting the oldest beyond ``max_records``."""
        self.items[int(record_id)] = record
        while len(self.items) > self.max_records:
            self.items.popitem(last=False)

    def pop_many(self, record_ids: list[int]) -> list[dict | None]:
        """Remove and return the records of ``record_ids`` (``None`` for unknown ids), in order."""
        return [self.items.pop(int(i), None) for i in record_ids]

    def size(self) -> int:
        """Number of stored records."""
        return len(self.items)


_LOCAL = _Records()
_HANDLE: list = []  # the cached Ray actor handle of this process


def new_record_id() -> int:
    """A random positive id below 2**52 (exact as int64 and float64)."""
    return random.SystemRandom().randrange(1, 2**52)


def _ray_store():
    """The shared Ray actor handle, or ``None`` when this process is not connected to Ray."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    if not _HANDLE:
        actor_cls = ray.remote(num_cpus=0)(_Records)
        _HANDLE.append(actor_cls.options(name=STORE_NAME, get_if_exists=True).remote())
    return _HANDLE[0]


def publish(record_id: int, record: dict) -> None:
    """Store a trajectory's CalibAdv record (plain JSON-like dict) under ``record_id``."""
    store = _ray_store()
    if store is None:
        _LOCAL.put(record_id, record)
    else:
        import ray

        ray.get(store.put.remote(record_id, record))


async def publish_async(record_id: int, record: dict) -> None:
    """:func:`publish` for the agent's event loop (awaits the Ray call instead of blocking the vLLM actor)."""
    store = _ray_store()
    if store is None:
        _LOCAL.put(record_id, record)
    else:
        await store.put.remote(record_id, record)


def collect(record_ids: list[int]) -> list[dict | None]:
    """Remove and return the records of ``record_ids`` (``None`` where a record is missing)."""
    store = _ray_store()
    if store is None:
        return _LOCAL.pop_many(record_ids)
    import ray

    return ray.get(store.pop_many.remote(list(record_ids)))
