"""``python -m openrlhf_search.integrations.openrlhf.launch``: the OpenRLHF backend's historical entry point.

The backend itself lives in three typed pieces, registered as the ``openrlhf`` and ``megatron`` backends by
:mod:`.backend`: :mod:`.flags` (the pure translation of a config into OpenRLHF 0.11.2's ``train_ppo_ray`` flags and
the patch config), :mod:`.plan` (every check of a launch at once, then the :class:`~.plan.LaunchPlan`: command,
environment, agent/patch/Megatron configs, retrieval server) and :mod:`.run` (write the files, start the retrieval
server, run OpenRLHF, stop the server). This module keeps the names older scripts import and a ``main`` that is
``openrlhf-search train --backend openrlhf``.
"""

from __future__ import annotations

import sys

from openrlhf_search.trainer import cli_train
from openrlhf_search.trainer.config import TrainConfig, load_config

from .config import OpenRLHFConfig
from .flags import (
    AGENT_FILE,
    ESTIMATORS,
    NATIVE_LOSSES,
    SCHEDULES,
    SITECUSTOMIZE_DIR,
    WANDB_KEY_FROM_ENV,
    build_flags,
    resolve_algorithm,
    response_budget,
    save_steps,
)
from .plan import (
    LaunchPlan,
    build_plan,
    check_cluster_inputs,
    cluster_problems,
    cluster_size,
    cpu_shim_env,
    plan_problems,
    resolve_backend,
    run_nodes,
)
from .run import (
    check_tokenizer_reloads,
    load_train_samples,
    materialize,
    run_openrlhf,
    wait_for_health,
    write_prompt_dataset,
)

__all__ = ["AGENT_FILE", "ESTIMATORS", "NATIVE_LOSSES", "SCHEDULES", "SITECUSTOMIZE_DIR", "WANDB_KEY_FROM_ENV",
           "build_flags", "resolve_algorithm", "response_budget", "save_steps", "LaunchPlan", "build_plan",
           "check_cluster_inputs", "cluster_problems", "cluster_size", "run_nodes", "cpu_shim_env", "plan_problems",
           "resolve_backend", "check_tokenizer_reloads", "load_train_samples", "materialize", "run_openrlhf",
           "wait_for_health", "write_prompt_dataset", "load_configs", "main"]  # fmt: skip


def load_configs(path: str | None, overrides: list[str]) -> tuple[TrainConfig, OpenRLHFConfig]:
    """``(TrainConfig, its openrlhf section)`` from the one loader."""
    cfg = load_config(path, overrides)
    return cfg, cfg.openrlhf


def main(argv: list[str] | None = None) -> int:
    """``python -m openrlhf_search.integrations.openrlhf.launch --config F [--dry-run] [key=value ...]``: the same as
    ``openrlhf-search train --backend openrlhf`` (``backend: megatron`` in the config keeps the Megatron actors)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m openrlhf_search.integrations.openrlhf.launch",
                                     description="Train a search agent with OpenRLHF (Ray + vLLM + DeepSpeed).")
    cli_train.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.backend is None:
        args.backend = "openrlhf"
    return cli_train.run(args)


if __name__ == "__main__":
    sys.exit(main())
