"""The ``local`` backend: train in this process (HF or vLLM rollouts, the update in torch on the CPU or one GPU)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from openrlhf_search.backends.base import BACKENDS, RunOptions
from openrlhf_search.config import origin
from openrlhf_search.registry import did_you_mean
from openrlhf_search.trainer.config import TrainConfig
from openrlhf_search.trainer.local import train_or_exit_code
from openrlhf_search.trainer.logging import run_report

CPU_FLOPS = 5e9
"""Effective floating-point operations per second of sampling on a CPU (two busy cores: SmolLM2-135M generated
about 16 tokens/s at batch 8, i.e. 2 x 135M x 16 ~ 4.3e9): a coarse figure, for warnings only."""

SMOLLM2_PARAMS = 135_000_000


def model_parameters(cfg: TrainConfig) -> int | None:
    """Approximate parameter count of ``model.path`` (the tiny model's from its shape, SmolLM2-135M, or an HF
    checkpoint directory's ``config.json``); None if unknown."""
    m = cfg.model
    if m.path == "tiny":
        h, layers, inter, vocab = m.hidden_size, m.num_layers, m.intermediate_size, m.vocab_size
    elif m.path == "smollm2":
        return SMOLLM2_PARAMS
    else:
        try:
            c = json.loads((Path(m.path) / "config.json").read_text(encoding="utf-8"))
            h, layers, inter, vocab = (int(c["hidden_size"]), int(c["num_hidden_layers"]),
                                       int(c["intermediate_size"]), int(c["vocab_size"]))  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return layers * (4 * h * h + 3 * h * inter) + vocab * h


def _on_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    if device != "auto":
        return False
    import torch  # heavy: only to know whether "auto" means the CPU

    return not torch.cuda.is_available()


def budget_warnings(cfg: TrainConfig) -> list[str]:
    """A warning when the sampling budget of one RL step (prompts x samples x turns x tokens per turn) is far beyond
    what the CPU generates in the run's time budget (``max_step_seconds``; without one: in 10 minutes per step)."""
    params = model_parameters(cfg)
    if params is None or not _on_cpu(str(cfg.device)):
        return []
    ro, env = cfg.rollout, cfg.env
    tokens = ro.prompts_per_step * ro.group_size * env.max_turns * env.max_tokens_per_turn
    rate = CPU_FLOPS / (2 * params)
    step = tokens / rate
    budget = cfg.max_step_seconds if cfg.max_step_seconds > 0 else 600.0 * cfg.steps
    if step * cfg.steps <= 10 * budget and step <= budget:
        return []
    if cfg.max_step_seconds > 0:
        where = f"the time budget max_step_seconds={cfg.max_step_seconds:g} allows about {budget / step:.1f} steps"
    else:
        where = f"{cfg.steps} steps take about {step * cfg.steps / 3600:.1f} h"
    return [f"one RL step samples up to {tokens} tokens (rollout.prompts_per_step={ro.prompts_per_step} x "
            f"group_size={ro.group_size} x env.max_turns={env.max_turns} x max_tokens_per_turn="
            f"{env.max_tokens_per_turn}); at ~{rate:.0f} tokens/s for a {params / 1e6:.0f}M-parameter model on the "
            f"CPU that is ~{step / 60:.0f} min per step, and {where}: lower those budgets (or use a GPU)"]


@dataclass
class LocalPlan:
    """A local run: the config and the run-directory mode."""

    cfg: TrainConfig
    """The validated config."""
    mode: str
    """``fresh``, ``resume``, ``resume_or_start`` or ``overwrite``."""
    warnings: list[str] = field(default_factory=list)
    """What may make the run useless without making it invalid (:func:`budget_warnings`)."""

    def render(self) -> str:
        c = self.cfg
        head = "".join(f"# warning: {w}\n" for w in self.warnings)
        return head + (f"# local trainer ({self.mode}): model {c.model.path}, algorithm {c.algorithm.name}, "
                       f"{c.steps} steps of {c.rollout.prompts_per_step} x {c.rollout.group_size} samples, "
                       f"{c.rollout.engine} rollouts on device {c.device}; outputs in {c.logging.output_dir}")


def _where(cfg: TrainConfig, key: str, message: str) -> str:
    where = origin(cfg, key)
    return f"{message} [{where}]" if where else message


def warm_start_problems(cfg: TrainConfig) -> list[str]:
    """The local trainer's warm start on the user's data. Its demonstrations and copy objective are built from the
    synthetic knowledge base, so each warm-start option set with ``data.source: files`` is refused by its own key;
    and a random-init ``tiny`` model on the user's data (which then has no warm start) cannot learn -- reward 0 at
    every step -- so it is refused too."""
    if cfg.data.source != "files":
        return []
    out = []
    for key, what in (("steps", "demonstrations are"), ("copy_steps", "copy objective is"),
                      ("demo_worlds", "demonstration worlds are")):  # fmt: skip
        value = getattr(cfg.sft, key)
        if key == "steps" and cfg.sft.demonstrations == "retrieved":
            continue  # demonstrations played on the user's own training questions
        if value > 0:
            out.append(_where(cfg, f"sft.{key}", f"sft.{key}={value}: the warm start's {what} built from the "
                              "synthetic knowledge base, so it needs data.source=synthetic (got data.source=files); "
                              f"set sft.{key}=0" + (" or sft.demonstrations=retrieved (played on your training "
                                                    "questions)" if key == "steps" else "")))  # fmt: skip
    if cfg.model.path == "tiny" and not out:
        out.append(_where(cfg, "model.path", "model.path='tiny': a random-init model on your own data "
                          "(data.source=files) cannot learn, it knows no language and has no warm start there; use a "
                          "pretrained model (model.path=smollm2 or an HF checkpoint directory)"))  # fmt: skip
    return out


class LocalBackend:
    """This process: :func:`openrlhf_search.trainer.local.train`."""

    description = "this process: HF or vLLM rollouts, the update in torch (CPU or one GPU)"

    def validate(self, cfg: TrainConfig, options: RunOptions) -> list[str]:
        out = []
        m = cfg.model
        if not (m.path in ("tiny", "smollm2") or Path(m.path).exists() or m.path.count("/") == 1):
            hint = did_you_mean(m.path, ["tiny", "smollm2"])
            out.append(_where(cfg, "model.path", f"model.path={m.path!r}: not 'tiny', 'smollm2', an existing "
                              f"checkpoint directory or a hub id (org/name){hint}"))
        return out + warm_start_problems(cfg)

    def plan(self, cfg: TrainConfig, options: RunOptions) -> LocalPlan:
        return LocalPlan(cfg, options.mode, budget_warnings(cfg))

    def run(self, plan: LocalPlan, options: RunOptions) -> int:
        for warning in plan.warnings:
            print(f"{options.prog}: warning: {warning}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        summary = train_or_exit_code(plan.cfg, plan.mode, options.prog)
        if isinstance(summary, int):
            return summary
        print("\n" + run_report(summary, time.perf_counter() - t0))  # every figure: <output_dir>/summary.json
        return 0


BACKENDS.add("local", LocalBackend())
