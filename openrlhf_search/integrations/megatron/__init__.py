"""Megatron-core backend: tensor/pipeline/data-parallel training of 14B+ search agents inside OpenRLHF's Ray pipeline.

Modules (megatron-core, mbridge, Ray and OpenRLHF are imported lazily, inside functions):

* :mod:`.config` -- typed configs: :class:`~.config.MegatronParallelConfig` (TP/PP/VPP/CP/SP),
  :class:`~.config.MegatronTrainConfig` (precision, distributed optimizer, recompute, Adam, buckets),
  :class:`~.config.MegatronActorConfig` (what the actors receive, as JSON), :class:`~.config.ActorSettings`;
* :mod:`.cpu_shim` -- runs megatron-core 0.16 on CPU with gloo (tests/CI), plus the CUDA trace recorder;
* :mod:`.model` -- GPTModel from an HF Llama/Qwen2/Qwen2.5/Qwen3 checkpoint via mbridge, HF export;
* :mod:`.logprobs` -- vocabulary-parallel log-probs and entropies of sampled tokens;
* :mod:`.engine` -- log-prob forward and registry-loss training steps through megatron's pipeline schedules;
* :mod:`.weight_sync` / :mod:`.vllm_sync` -- bucketed weight sync in HF names (to vLLM);
* :mod:`.actor` -- the policy/reference actors OpenRLHF's PPO trainer drives;
* :mod:`.launch` -- run a script as N local gloo ranks (CPU debugging, tests).

See ``docs/megatron.md`` for what is verified on CPU and what is written for GPUs but not verified here.
"""

MEGATRON_CORE_VERSION = "0.16.1"
"""The megatron-core version this backend is pinned to and tested with (``pip install megatron-core==0.16.1``)."""

MBRIDGE_VERSION = "0.15.1"
"""The mbridge version used for HF <-> Megatron weights."""
