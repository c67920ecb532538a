"""``python -m openrlhf_search.integrations.openrlhf.entrypoint <train_ppo_ray flags>``: OpenRLHF with our patches.

What it does, in order:

1. parses the flags with OpenRLHF's own parser (:func:`.compat.openrlhf_argument_parser`), so a bad flag fails
   here with OpenRLHF's message;
2. reads the :class:`~.config.PatchConfig` named by ``OPENRLHF_SEARCH_PATCH_CONFIG`` (none: plain OpenRLHF) and
   swaps OpenRLHF's actor classes for ours (:func:`.patches.apply_patches`); with the Megatron backend's
   ``MegatronActorConfig`` named by ``OPENRLHF_SEARCH_MEGATRON_CONFIG`` (``backend: megatron``), the policy,
   reference and vLLM actor classes become the Megatron ones (:func:`.patches.apply_megatron_backend`);
3. makes vLLM report processed (post-temperature) log-probs (:func:`request_processed_logprobs`);
4. starts (or joins, with ``RAY_ADDRESS``) Ray with a runtime environment that carries the agent config *inline*
   to every worker on every node -- OpenRLHF then skips its own ``ray.init`` -- and, under the CPU shim, logical
   GPUs (:func:`.cpu_shim.ray_init_kwargs`), and checks that the prompt dataset is visible on every node
   (:func:`check_shared_files`);
4b. with ``OPENRLHF_SEARCH_RETRIEVAL_REPLICAS`` (``openrlhf.retrieval_replicas``), starts the retrieval replicas as
   Ray actors and their directory (:func:`openrlhf_search.retrieval.replicas.start_from_env`): they live as long as
   this driver, and the agents find them by the directory's name;
5. runs ``openrlhf.cli.train_ppo_ray`` as ``__main__``, exactly as ``python -m openrlhf.cli.train_ppo_ray`` would.
"""

from __future__ import annotations

import inspect
import os
import runpy
import sys
from pathlib import Path

from openrlhf_search.integrations.megatron.config import MegatronActorConfig
from openrlhf_search.retrieval import replicas

from . import cpu_shim
from .compat import check_openrlhf_version, openrlhf_argument_parser
from .config import AGENT_CONFIG_ENV, PATCH_CONFIG_ENV, SHARED_FILES_ENV, PatchConfig, from_env

MEGATRON_CONFIG_ENV = "OPENRLHF_SEARCH_MEGATRON_CONFIG"
"""Path of the ``MegatronActorConfig`` JSON (same name as ``megatron.config.MEGATRON_CONFIG_ENV``)."""
MEGATRON_CPU_SHIM_ENV = "OPENRLHF_SEARCH_MEGATRON_CPU_SHIM"
"""Switch of megatron-core's CPU shim (``megatron/cpu_shim.py``) in the Megatron actors."""

FORWARDED_ENV = (cpu_shim.SWITCH_ENV, "PYTHONPATH", "DS_ACCELERATOR", "GLOO_SOCKET_IFNAME", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "OPENRLHF_SEARCH_ALLOW_VERSION_MISMATCH", MEGATRON_CPU_SHIM_ENV,
                 "OPENRLHF_SEARCH_RETRIEVER_TOKEN", "OPENRLHF_SEARCH_TOKEN", "WANDB_API_KEY", "WANDB_MODE",
                 "WANDB_DIR", "WANDB_BASE_URL", "WANDB_ENTITY")  # fmt: skip
"""Driver environment variables copied into Ray's runtime environment (workers on other nodes do not inherit).

Not ``VLLM_HOST_IP``: vLLM takes it as *its own* address, so the head node's value on every node would make each
engine announce the head's IP. It is forwarded only under the CPU shim (one machine, loopback)."""

OPENRLHF_DEFAULT_ENV = {
    "TOKENIZERS_PARALLELISM": "true",
    "NCCL_DEBUG": "WARN",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}
"""What OpenRLHF's own ``ray.init`` would have set (kept, since ours replaces it)."""


def runtime_env_vars() -> dict[str, str]:
    """Environment for every Ray worker: OpenRLHF's defaults, forwarded variables, the agent config inline."""
    env = {k: os.environ.get(k, v) for k, v in OPENRLHF_DEFAULT_ENV.items()}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    if cpu_shim.enabled() and "VLLM_HOST_IP" in os.environ:
        env["VLLM_HOST_IP"] = os.environ["VLLM_HOST_IP"]
    agent = os.environ.get(AGENT_CONFIG_ENV, "")
    if agent and not agent.lstrip().startswith("{"):
        path = Path(agent)
        if not path.is_file():
            raise FileNotFoundError(f"{AGENT_CONFIG_ENV}={agent}: file not found")
        agent = path.read_text(encoding="utf-8")
    if agent:
        env[AGENT_CONFIG_ENV] = agent
    return env


def init_ray() -> None:
    """Start or join Ray with :func:`runtime_env_vars` (and logical GPUs under the CPU shim)."""
    import ray

    kwargs: dict = {"runtime_env": {"env_vars": runtime_env_vars()}}
    if cpu_shim.enabled() and not os.environ.get("RAY_ADDRESS"):
        kwargs.update(cpu_shim.ray_init_kwargs())
    ray.init(**kwargs)


def check_shared_files(paths: list[str]) -> None:
    """Raise ``RuntimeError`` naming the node and path if a file is missing on some alive Ray node.

    OpenRLHF's trainer actor (the prompt dataset) and the actor ranks (checkpoints) run wherever Ray places them, so
    a multi-node run needs ``openrlhf.shared_dir`` to be one filesystem; this catches a local directory early."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def missing(files: list[str]) -> list[str]:
        return [f for f in files if not os.path.exists(f)]

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {n["NodeManagerAddress"]: missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(paths) for n in nodes}  # fmt: skip
    problems = [f"{f} (node {addr})" for addr, ref in refs.items() for f in ray.get(ref)]
    if problems:
        raise RuntimeError("not visible on every Ray node: " + ", ".join(problems) + "; set openrlhf.shared_dir to "
                           "a directory mounted at the same path on every node")  # fmt: skip


def request_processed_logprobs() -> None:
    """Make every vLLM engine return *processed* log-probs (after temperature), the distribution it samples from.

    OpenRLHF 0.11.2 passes ``logprobs_mode="processed_logprobs"`` to vLLM only with
    ``--algo.advantage.is_correction_level`` != off; otherwise vLLM returns raw (pre-temperature) log-probs, and
    the rollout/trainer gap (``search_loss/rollout_logprob_abs_diff``, the trainer's log-probs are computed at the
    rollout temperature) is off by the temperature whenever it is not 1, which reads like a broken weight sync.
    Sampling is unchanged; only the reported log-probs are. (With ``top_p`` < 1 vLLM's processed log-probs are
    renormalised over the nucleus, the trainer's are not: a residual gap that is not a sync problem.)"""
    import openrlhf.trainer.ray as ray_pkg
    import openrlhf.trainer.ray.vllm_engine as vllm_engine_mod

    original = vllm_engine_mod.create_vllm_engines
    if getattr(original, "_openrlhf_search_processed", False):
        return
    names = list(inspect.signature(original).parameters)

    def create_vllm_engines(*args, **kwargs):
        index = names.index("logprobs_mode")
        if len(args) > index:
            args = (*args[:index], args[index] or "processed_logprobs", *args[index + 1:])
        else:
            kwargs["logprobs_mode"] = kwargs.get("logprobs_mode") or "processed_logprobs"
        return original(*args, **kwargs)

    create_vllm_engines._openrlhf_search_processed = True
    vllm_engine_mod.create_vllm_engines = create_vllm_engines
    ray_pkg.create_vllm_engines = create_vllm_engines  # what ``openrlhf.cli.train_ppo_ray`` imports


def main(argv: list[str] | None = None) -> int:
    """Run OpenRLHF's ``train_ppo_ray`` with ``argv`` and our patches; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from openrlhf.utils.config import hierarchize

    from .patches import apply_patches

    check_openrlhf_version()
    args = hierarchize(openrlhf_argument_parser().parse_args(argv))
    patch = from_env(PatchConfig, PATCH_CONFIG_ENV) if os.environ.get(PATCH_CONFIG_ENV) else PatchConfig()
    apply_patches(patch, args)
    if os.environ.get(MEGATRON_CONFIG_ENV):
        from .patches import apply_megatron_backend

        apply_megatron_backend(MegatronActorConfig.from_env(), args)
    request_processed_logprobs()
    init_ray()
    shared = [p for p in os.environ.get(SHARED_FILES_ENV, "").split(os.pathsep) if p]
    if shared:
        check_shared_files(shared)
    try:
        replicas.start_from_env()
    except (RuntimeError, ValueError) as exc:
        print(f"openrlhf-search: retrieval replicas: {exc}", file=sys.stderr)
        return 2
    sys.argv = ["openrlhf.cli.train_ppo_ray", *argv]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
