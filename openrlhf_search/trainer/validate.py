"""Validate a whole config before any expensive work: one pass, every problem at once, exit code 2.

:func:`validate_config` checks every name against its registry (algorithm, advantage estimator and post-processors,
loss overrides, KL estimator, template, reward, schedule, rollout engine, retriever kind, tools) with a "did you
mean" for near misses, and every numeric range (``group_size >= 2`` for group estimators, ``temperature > 0``,
``top_p`` in ``(0, 1]``, positive counts, a finite positive learning rate...). It imports only the registries (and
the config's ``plugins``), so it answers within seconds of the command -- before data loading, model building or
the warm start -- and then asks the selected backend (:mod:`openrlhf_search.backends`) for its own problems. Every
front end calls it: ``train`` (every backend), ``quickstart``, ``eval``.

Each problem names the key, the value and where it was set (``file:line`` or the override).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

from openrlhf_search.algorithms.advantages import ADVANTAGE_ESTIMATORS
from openrlhf_search.algorithms.kl import KL_ESTIMATORS
from openrlhf_search.algorithms.postprocess import ADVANTAGE_POSTPROCESSORS
from openrlhf_search.algorithms.presets import advantage_pipeline, preset_for
from openrlhf_search.backends import BACKENDS, RunOptions
from openrlhf_search.config import ConfigError, origin
from openrlhf_search.env.templates import available_templates, get_template
from openrlhf_search.env.tools import TOOLS, get_tools
from openrlhf_search.plugins import PluginError, load_plugins
from openrlhf_search.registry import Registry, did_you_mean
from openrlhf_search.retrieval import LOADERS
from openrlhf_search.rewards import available_rewards, get_reward_fn
from openrlhf_search.rollout import ENGINES
from openrlhf_search.trainer import lora

from .config import TrainConfig, load_config_result

LR_SCHEDULES: Registry[str] = Registry("learning-rate schedule")
"""``optimizer.schedule`` names (the local trainer's ``lr_lambda``; the OpenRLHF launcher maps them too)."""
LR_SCHEDULES.add("constant", "constant after warm-up")
LR_SCHEDULES.add("linear", "linear decay to 0 after warm-up")
LR_SCHEDULES.add("cosine", "cosine decay to 0 after warm-up")

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
"""Built-in estimators whose baseline is the group: with one sample per group every advantage is 0."""

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


class _Problems:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.items: list[str] = []

    def add(self, key: str, message: str, value: Any = ...) -> None:
        where = origin(self.cfg, key) if key else ""
        shown = "" if value is ... else f"={value!r}"
        self.items.append(f"{key}{shown}: {message}" + (f" [{where}]" if where else "") if key else message)

    def check(self, key: str, ok: bool, message: str) -> None:
        if not ok:
            self.add(key, message, _get(self.cfg, key))


def _get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _name_problem(registry_error: Exception) -> str:
    return str(registry_error.args[0]) if isinstance(registry_error, KeyError) and registry_error.args else str(
        registry_error)


def backend_name(cfg: TrainConfig, backend: str | None = None) -> str:
    """The backend a run uses: ``backend`` (the command line's ``--backend``) when given, else ``cfg.backend``;
    ``--backend openrlhf`` with ``backend: megatron`` in the config is the Megatron strategy of the OpenRLHF
    backend, i.e. ``megatron``."""
    if not backend:
        return cfg.backend
    return "megatron" if backend == "openrlhf" and cfg.backend == "megatron" else backend


def validate_config(cfg: TrainConfig, backend: str | None = None, check_files: bool = True) -> list[str]:
    """Every problem of ``cfg`` for ``backend`` (default: ``cfg.backend``, which this sets), one line each; ``[]``
    if none: the sections' own checks, then the backend's (:meth:`openrlhf_search.backends.Backend.validate`).

    ``check_files=False`` (a ``--dry-run``) skips the existence of data files and index directories."""
    p = _Problems(cfg)
    name = backend_name(cfg, backend)
    if cfg.backend != name and cfg.backend not in BACKENDS:  # the config's own word, overridden by --backend
        p.add("backend", BACKENDS.unknown_message(cfg.backend), cfg.backend)
    cfg.backend = name

    # ---- plugins first: they may register the names checked below
    try:
        load_plugins(cfg.plugins)
    except PluginError as exc:
        p.add("plugins", str(exc).removeprefix("plugins: "), list(cfg.plugins))
    if name not in BACKENDS:
        p.add("backend", BACKENDS.unknown_message(name), name)

    # ---- algorithm
    alg = cfg.algorithm
    preset = None
    try:
        preset = preset_for(alg)
    except (KeyError, ValueError) as exc:
        key = "algorithm.policy_loss" if "policy loss" in str(exc) else "algorithm.name"
        p.add(key, _name_problem(exc), _get(cfg, key))
    estimator = ""
    if preset is not None:
        try:
            preset.build_loss(**alg.loss_overrides)
        except (TypeError, ValueError) as exc:
            p.add("algorithm.loss_overrides", str(exc), alg.loss_overrides)
        estimator, _, chain = advantage_pipeline(preset, alg)
        if alg.advantage_estimator and alg.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            p.add("algorithm.advantage_estimator", ADVANTAGE_ESTIMATORS.unknown_message(estimator), estimator)
        for name, _ in chain:
            if name not in ADVANTAGE_POSTPROCESSORS:
                p.add("algorithm.advantage_postprocessors", ADVANTAGE_POSTPROCESSORS.unknown_message(name), name)
    unknown_cfg = sorted(set(alg.postprocessor_config) - set(alg.advantage_postprocessors) - {"calibadv"})
    if unknown_cfg:
        p.add("algorithm.postprocessor_config", f"entries {unknown_cfg} name no post-processor of "
              "algorithm.advantage_postprocessors")  # fmt: skip
    if alg.kl_estimator not in KL_ESTIMATORS:
        p.add("algorithm.kl_estimator", KL_ESTIMATORS.unknown_message(alg.kl_estimator), alg.kl_estimator)
    p.check("algorithm.ppo_epochs", alg.ppo_epochs >= 1, "must be >= 1 (0 trains nothing)")
    p.check("algorithm.num_minibatches", alg.num_minibatches >= 1, "must be >= 1")
    p.check("algorithm.kl_coef", _finite(alg.kl_coef) and alg.kl_coef >= 0, "must be finite and >= 0")
    p.check("algorithm.calib_lambda", _finite(alg.calib_lambda) and alg.calib_lambda > 0, "must be finite and > 0")

    # ---- rollout
    ro = cfg.rollout
    if ro.engine not in ENGINES:
        p.add("rollout.engine", ENGINES.unknown_message(ro.engine), ro.engine)
    p.check("rollout.prompts_per_step", ro.prompts_per_step >= 1, "must be >= 1")
    group_based = preset is None or estimator in GROUP_ESTIMATORS or getattr(
        ADVANTAGE_ESTIMATORS.get(estimator) if estimator in ADVANTAGE_ESTIMATORS else None, "group_based", False)
    if group_based:
        p.check("rollout.group_size", ro.group_size >= 2,
                f"must be >= 2 for the group estimator {estimator or 'of the algorithm'!r} (with one sample per "
                "group every advantage is 0: nothing is learned)")
    else:
        p.check("rollout.group_size", ro.group_size >= 1, "must be >= 1")
    p.check("rollout.temperature", _finite(ro.temperature) and ro.temperature > 0,
            "must be > 0 (sampling; the trainer scores at the same temperature)")
    p.check("rollout.top_p", _finite(ro.top_p) and 0 < ro.top_p <= 1, "must be in (0, 1]")
    p.check("rollout.eval_temperature", _finite(ro.eval_temperature) and ro.eval_temperature >= 0,
            "must be >= 0 (0 = greedy)")
    p.check("rollout.max_filter_rounds", ro.max_filter_rounds >= 1, "must be >= 1")
    p.check("rollout.weight_sync_turns", ro.weight_sync_turns >= 0, "must be >= 0")

    # ---- top level
    p.check("steps", cfg.steps >= 1, "must be >= 1")
    p.check("max_step_seconds", _finite(cfg.max_step_seconds) and cfg.max_step_seconds >= 0, "must be >= 0")
    dev = str(cfg.device)
    if dev not in ("auto", "cpu", "cuda", "mps") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        p.add("device", "expected auto, cpu, cuda, cuda:N or mps" + did_you_mean(dev, ["auto", "cpu", "cuda"]), dev)

    # ---- optimizer
    opt = cfg.optimizer
    p.check("optimizer.lr", _finite(opt.lr) and opt.lr > 0, "must be finite and > 0")
    p.check("optimizer.weight_decay", _finite(opt.weight_decay) and opt.weight_decay >= 0, "must be >= 0")
    p.check("optimizer.betas", all(_finite(b) and 0 <= b < 1 for b in opt.betas), "each must be in [0, 1)")
    p.check("optimizer.grad_clip", _finite(opt.grad_clip) and opt.grad_clip >= 0, "must be >= 0 (0 disables)")
    p.check("optimizer.warmup_steps", opt.warmup_steps >= 0, "must be >= 0")
    if opt.schedule not in LR_SCHEDULES:
        p.add("optimizer.schedule", LR_SCHEDULES.unknown_message(opt.schedule), opt.schedule)

    # ---- env: template, reward, tools, limits
    env = cfg.env
    if env.template not in available_templates() and not Path(str(env.template)).is_file():
        p.add("env.template", f"unknown template{did_you_mean(env.template, available_templates())}; valid names: "
              f"{', '.join(available_templates())} (or a template file)", env.template)  # fmt: skip
    else:
        try:
            get_template(env.template)
        except Exception as exc:  # a broken template file
            p.add("env.template", str(exc), env.template)
    if env.reward not in available_rewards():
        p.add("env.reward", f"unknown reward{did_you_mean(env.reward, available_rewards())}; valid names: "
              f"{', '.join(available_rewards())}", env.reward)  # fmt: skip
    else:
        try:
            get_reward_fn(env.reward, **env.reward_kwargs)
        except (TypeError, ValueError) as exc:
            p.add("env.reward_kwargs", str(exc), env.reward_kwargs)
    unknown_tools = [tool for tool in env.tools if tool not in TOOLS]
    for tool in unknown_tools:
        p.add("env.tools", TOOLS.unknown_message(tool), tool)
    if env.tool_options and not unknown_tools:
        try:  # each tool's own settings, checked by building the tools once
            get_tools(list(env.tools), env)
        except (TypeError, ValueError) as exc:
            p.add("env.tool_options", str(exc), env.tool_options)
    for key, message in env.problems():
        p.add(f"env.{key}", message, getattr(env, key))

    # ---- retriever
    r = cfg.retriever
    p.check("retriever.timeout", _finite(r.timeout) and r.timeout > 0, "must be > 0")
    if name == "local" or (cfg.retriever.spec and not cfg.openrlhf.retrieval_url):
        _check_retriever_spec(cfg, p, check_files)

    # ---- data, model, sft, logging
    d = cfg.data
    if d.source not in ("synthetic", "files"):
        p.add("data.source", "expected 'synthetic' or 'files'" + did_you_mean(d.source, ["synthetic", "files"]),
              d.source)
    elif d.source == "files":
        if not d.train_files:
            p.add("data.train_files", "data.source=files needs at least one training file", d.train_files)
        for key in ("train_files", "eval_files") if check_files else ():
            missing = [f for f in getattr(d, key) if not Path(f).exists()]
            if missing:
                p.add(f"data.{key}", f"file(s) not found: {missing}")
    p.check("data.num_train", d.num_train >= 1, "must be >= 1")
    p.check("data.num_eval", d.num_eval >= 0, "must be >= 0")
    p.check("data.num_entities", d.num_entities >= 2, "must be >= 2")
    p.check("data.two_hop_fraction", _finite(d.two_hop_fraction) and 0 <= d.two_hop_fraction <= 1, "must be in [0, 1]")
    m = cfg.model
    if m.dtype not in MODEL_DTYPES:
        p.add("model.dtype", f"expected one of {list(MODEL_DTYPES)}{did_you_mean(m.dtype, MODEL_DTYPES)}", m.dtype)
    if m.path == "tiny":
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            p.check(f"model.{key}", getattr(m, key) >= 1, "must be >= 1")
        if m.num_heads >= 1 and m.num_kv_heads >= 1:
            p.check("model.hidden_size", m.hidden_size % m.num_heads == 0, "must be divisible by model.num_heads")
            p.check("model.num_heads", m.num_heads % m.num_kv_heads == 0, "must be divisible by model.num_kv_heads")
    s = cfg.sft
    p.check("sft.demonstrations", s.demonstrations in ("synthetic", "retrieved"),
            "must be 'synthetic' or 'retrieved'")
    for key in ("steps", "copy_steps", "num_demos", "demo_worlds"):
        p.check(f"sft.{key}", getattr(s, key) >= 0, "must be >= 0")
    for key in ("batch_size", "copy_batch_size"):
        p.check(f"sft.{key}", getattr(s, key) >= 1, "must be >= 1")
    if s.steps > 0 or s.copy_steps > 0:
        p.check("sft.lr", _finite(s.lr) and s.lr > 0, "must be finite and > 0")
    for key in ("mistake_rate", "no_search_share"):
        p.check(f"sft.{key}", _finite(getattr(s, key)) and 0 <= getattr(s, key) <= 1, "must be in [0, 1]")
    lg = cfg.logging
    for key in ("save_every", "eval_every", "sample_every", "rollout_every"):
        if not hasattr(lg, key):
            continue
        p.check(f"logging.{key}", getattr(lg, key) >= 0, "must be >= 0")
    p.check("logging.keep_checkpoints", lg.keep_checkpoints >= 1, "must be >= 1")
    if hasattr(lg, "save_every_seconds"):
        p.check("logging.save_every_seconds", _finite(lg.save_every_seconds) and lg.save_every_seconds >= 0,
                "must be >= 0 (0 = off)")
    if hasattr(opt, "max_skipped_steps"):
        p.check("optimizer.max_skipped_steps", opt.max_skipped_steps >= 0, "must be >= 0 (0 = never stop)")
    if hasattr(d, "long_questions") and d.long_questions not in ("refuse", "truncate", "skip"):
        p.add("data.long_questions", "expected refuse, truncate or skip"
              + did_you_mean(d.long_questions, ["refuse", "truncate", "skip"]), d.long_questions)
    if d.train_questions not in ("all", "answerable"):
        p.add("data.train_questions", "expected all or answerable"
              + did_you_mean(d.train_questions, ["all", "answerable"]), d.train_questions)
    if hasattr(d, "max_question_chars"):
        p.check("data.max_question_chars", d.max_question_chars >= 0, "must be >= 0 (0 = no limit)")
    if hasattr(m, "lora_rank"):
        p.check("model.lora_rank", m.lora_rank >= 0, "must be >= 0 (0 = full fine-tuning)")
    p.check("model.lora_rank", m.lora_rank <= 0 or lora.peft_installed(), lora.PEFT_MISSING)

    # ---- the selected backend's own checks (its section, its translation, the cluster arithmetic)
    if name in BACKENDS:
        try:
            found = BACKENDS.get(name).validate(cfg, RunOptions(dry_run=not check_files))
        except (ValueError, KeyError, TypeError) as exc:
            found = [f"backend {name}: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}"]
        named = {x.split("=")[0].split(":")[0] for x in p.items}  # a key (or text) already reported is not repeated
        p.items += [x for x in found
                    if x.split("=")[0].split(":")[0] not in named and not any(x in y for y in p.items)]
    return p.items


def _check_retriever_spec(cfg: TrainConfig, p: _Problems, check_files: bool = True) -> None:
    spec = cfg.retriever.spec
    if not spec:
        if cfg.data.source != "synthetic":
            p.add("retriever.spec", "empty (a BM25 index over the synthetic corpus) needs data.source=synthetic; give "
                  "an index directory or http(s)://host:port", spec)  # fmt: skip
        return
    if not check_files and not spec.startswith(("http://", "https://")) and "://" not in spec:
        return
    p.items.extend(f"retriever.spec={spec!r}: {msg}" + (f" [{origin(cfg, 'retriever.spec')}]"
                   if origin(cfg, "retriever.spec") else "") for msg in retriever_spec_problems(spec))  # fmt: skip


def retriever_spec_problems(spec: str) -> list[str]:
    """Problems of a retriever spec (URL, or an index directory whose manifest names a registered kind)."""
    if spec.startswith(("http://", "https://")):
        return []
    if "://" in spec:
        return [f"unsupported URL scheme {spec.split('://')[0]!r} (expected http:// or https://)"]
    d = Path(spec)
    if not d.is_dir():
        return ["neither an http(s):// URL nor an existing index directory"]
    manifest = d / "manifest.json"
    if not manifest.is_file():
        return [f"{manifest} not found (build the index with `openrlhf-search index`)"]
    try:
        import json

        method = json.loads(manifest.read_text(encoding="utf-8")).get("method")
    except (OSError, ValueError) as exc:
        return [f"{manifest}: unreadable manifest ({exc})"]
    return [] if method in LOADERS else [f"{manifest}: {LOADERS.unknown_message(method)}"]


def report(prog: str, exc: Exception) -> None:
    """Print a config error as the front ends do (one block on stderr, no traceback)."""
    print(f"{prog}: {exc}", file=sys.stderr)


def load_and_validate(path: str | None, overrides: list[str], backend: str | None = None,
                      prog: str = "openrlhf-search", tree: dict | None = None, source: str = "built-in config",
                      check_files: bool = True) -> TrainConfig | None:
    """Load (``path`` or the in-memory ``tree``) + overrides, then :func:`validate_config` for ``backend`` (default:
    the config's); print notes on old spellings, and on any problem print every one of them at once (``prog:
    ...``) and return None (the caller exits 2)."""
    try:
        result = load_config_result(path, overrides, tree=tree, source=source)
    except ConfigError as exc:  # the file itself (missing, invalid YAML)
        report(prog, exc)
        return None
    for note in result.notes:
        print(f"{prog}: note: {note}", file=sys.stderr)
    problems, cfg = list(result.problems), result.config
    if cfg is not None:
        flagged = {m.group(1) for p in problems  # keys the loader already named
                   if (m := re.search(r"'([A-Za-z_][\w.]*)'", p.split(": ", 1)[-1]))}
        found = validate_config(cfg, backend, check_files)
        problems += [p for p in found if p.split("=")[0].split(":")[0] not in flagged]
    if problems:
        report(prog, ConfigError("\n  ".join([f"{len(problems)} config problem(s):", *problems])
                                 if len(problems) > 1 else problems[0]))  # fmt: skip
        return None
    return cfg
