"""The ``openrlhf`` and ``megatron`` backends: OpenRLHF 0.11.2's Ray + vLLM trainer with this package's agent, with
OpenRLHF's DeepSpeed actors (``openrlhf.strategy: deepspeed``) or this package's Megatron actors (``backend:
megatron``, or ``openrlhf.strategy: megatron``).

``validate`` is :func:`.plan.plan_problems` (every problem at once), ``plan`` is :func:`.plan.build_plan`, ``run`` is
:func:`.run.execute` (files, retrieval server, OpenRLHF).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from openrlhf_search.backends.base import BACKENDS, RunOptions
from openrlhf_search.trainer.config import TrainConfig

from .plan import LaunchPlan, build_plan, cluster_problems, plan_problems
from .run import execute, resume_problem


@dataclass
class OpenRLHFRun:
    """A planned OpenRLHF run."""

    plan: LaunchPlan
    """Command, environment and generated configs."""
    cfg: TrainConfig
    """The config (the prompt dataset is written from it at run time)."""
    require_checkpoint: bool = False
    """``--resume``: refuse to start without a checkpoint."""

    def render(self) -> str:
        return self.plan.render()


class OpenRLHFBackend:
    """OpenRLHF's Ray trainer (see the module docstring)."""

    def __init__(self, description: str) -> None:
        self.description = description

    @staticmethod
    def _apply_mode(cfg: TrainConfig, options: RunOptions) -> None:
        if options.mode in ("resume", "resume_or_start") and not cfg.openrlhf.resume:  # --ckpt.load_enable
            cfg.openrlhf = dataclasses.replace(cfg.openrlhf, resume=True)

    def validate(self, cfg: TrainConfig, options: RunOptions) -> list[str]:
        self._apply_mode(cfg, options)
        out = plan_problems(cfg)
        if not out:  # what DeepSpeed, Ray and vLLM would refuse in the command itself
            out += cluster_problems(cfg, build_plan(cfg), cfg.openrlhf)
        if options.mode == "overwrite":
            out.append("--overwrite is not supported by the OpenRLHF backend; choose a new logging.output_dir")
        return out

    def plan(self, cfg: TrainConfig, options: RunOptions) -> OpenRLHFRun:
        self._apply_mode(cfg, options)
        return OpenRLHFRun(build_plan(cfg), cfg, require_checkpoint=options.mode == "resume")

    def run(self, plan: OpenRLHFRun, options: RunOptions) -> int:
        problem = resume_problem(plan.plan) if plan.require_checkpoint else ""
        if problem:
            print(f"{options.prog}: {problem}", file=sys.stderr)
            return 2
        return execute(plan.plan, plan.cfg)


BACKENDS.add("openrlhf", OpenRLHFBackend("Ray + vLLM + OpenRLHF's actors (openrlhf.strategy: deepspeed or megatron)"))
BACKENDS.add("megatron", OpenRLHFBackend("the OpenRLHF backend with this package's Megatron-core actors"))
