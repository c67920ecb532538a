"""Run outputs: ``metrics.jsonl``, TensorBoard, optional W&B, readable sample trajectories, the reward plot.

``metrics.jsonl`` holds one JSON object per RL step (``step``, ``reward_mean``, the loss diagnostics, turns and
searches per trajectory, response length, and the wall-time split ``time/generation``, ``time/retrieval``,
``time/update``, ``time/other``). On resume the file is truncated back to the checkpoint's step, so it never holds a
step twice; a torn last line (a crash or a full disk mid-write) is dropped with a message instead of failing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _jsonable(v: Any):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsLogger:
    """Append per-step metrics to ``metrics.jsonl`` and mirror scalars to TensorBoard / W&B.

    Args:
        output_dir: run directory.
        tensorboard: write ``<output_dir>/tb`` event files (``torch.utils.tensorboard``; skipped with a warning if
            tensorboard is not installed).
        wandb_project: W&B project name, or empty for none (``wandb`` imported lazily).
        resume_step: drop lines of steps ``> resume_step`` left by an interrupted run (``None``: start a new file).
        run_config: logged to W&B as the run config.
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, wandb_project: str = "",
                 resume_step: int | None = None, run_config: dict | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            rows, torn = _parse_lines(self.path)
            if torn:
                print(f"[openrlhf-search] {self.path}: dropped {len(torn)} unreadable line(s) (line "
                      f"{', '.join(str(n) for n in torn)}; a write torn by a crash or a full disk)", flush=True)
            kept = [json.dumps(r) for r in rows if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        self._fh = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"))
            except Exception as exc:  # tensorboard missing: metrics.jsonl is the source of truth anyway
                print(f"[openrlhf-search] TensorBoard disabled ({exc})")
        self.wandb = None
        if wandb_project:
            import wandb  # lazy, optional

            self.wandb = wandb.init(project=wandb_project, dir=str(self.dir), config=run_config or {}, resume="allow")

    def log(self, step: int, metrics: dict[str, Any], histograms: dict[str, list[float]] | None = None) -> None:
        """Write one step (``metrics`` must not contain ``step``); ``histograms`` (name -> values) go to TensorBoard
        as histograms (metrics.jsonl holds their summary, e.g. ``rollout/staleness_hist_{k}`` shares)."""
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.tb is not None:
            for k, values in (histograms or {}).items():
                if values:
                    import numpy as np

                    self.tb.add_histogram(k, np.asarray(values, dtype=np.float64), step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._fh.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _parse_lines(path: Path) -> tuple[list[dict], list[int]]:
    """``(rows, numbers of the lines that do not parse)``: a torn last line (disk full or a kill mid-write) is
    tolerated, so is anything that is not a JSON object."""
    rows, bad = [], []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for n, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError:
            bad.append(n)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(n)
    return rows, bad


def read_metrics(path: str | Path) -> list[dict]:
    """All readable rows of a ``metrics.jsonl`` (unreadable lines, e.g. a torn last one, are skipped)."""
    return _parse_lines(Path(path))[0]


def plot_reward_curve(metrics_path: str | Path, png_path: str | Path, keys=("reward_mean",), title: str = "") -> Path:
    """Plot ``keys`` against ``step`` (raw and a 5-step moving average) into ``png_path`` (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        xs, ys = zip(*pts)
        line = ax.plot(xs, ys, alpha=0.35, label=f"{key}")[0]
        w = 5
        avg = [sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]
        ax.plot(xs, avg, color=line.get_color(), label=f"{key} ({w}-step avg)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.set_title(title or str(Path(metrics_path).parent.name))
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(png_path), dpi=110)
    plt.close(fig)
    return Path(png_path)


def render_trajectory(traj, tokenizer, reward: float | None = None) -> str:
    """A readable transcript of one trajectory: the question, each model turn and observation, answer, reward.

    Model tokens and observation tokens are decoded separately (using ``action_mask``), so the transcript shows
    exactly which text the model wrote and which the environment inserted.
    """
    meta = getattr(traj, "meta", {}) or {}
    lines = [f"question: {meta.get('question', '?')}", f"golden answers: {meta.get('golden_answers', '?')}"]
    ids, mask = list(traj.response_ids), list(traj.action_mask)
    start = 0
    while start < len(ids):
        end = start
        while end < len(ids) and mask[end] == mask[start]:
            end += 1
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        lines.append(("[model] " if mask[start] else "[env]   ") + text.strip())
        start = end
    lines.append(f"answer: {getattr(traj, 'answer', None)!r}  finish: {getattr(traj, 'finish_reason', '?')}")
    if reward is not None:
        lines.append(f"reward: {reward:.3f}")
    return "\n".join(lines)


class Progress:
    """A progress bar (tqdm) showing reward, step time and ETA; silent when disabled.

    ``time_budget`` (seconds, 0 = none): the run also ends when that much time has passed (the trainer's
    ``max_step_seconds``); the ETA shown is then the earlier of the two ends, named (``steps`` or ``time budget``),
    instead of tqdm's extrapolation to ``total`` steps, which a budget-bound run never reaches.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "RL", unit: str = "step",
                 time_budget: float = 0.0):
        self.bar = None
        self.total, self.initial, self.time_budget = total, initial, float(time_budget or 0.0)
        self.t0 = time.perf_counter()
        if enabled:
            import sys

            from tqdm.auto import tqdm

            # A terminal redraws in place; a log file (CI, Slurm) would get one line per redraw: redraw rarely there.
            tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
            fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]" if self.time_budget > 0 else None
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, unit=unit,
                            mininterval=0.5 if tty else 30.0, bar_format=fmt,
                            postfix={"ETA": self._eta_text(initial)} if self.time_budget > 0 else None)

    def eta(self, n: int) -> tuple[float, str]:
        """``(seconds left, what ends the run)`` after ``n`` steps: the remaining steps at the mean step time so far,
        or the rest of the time budget when that comes first (or before any step is timed)."""
        elapsed = time.perf_counter() - self.t0
        left = max(0.0, self.time_budget - elapsed) if self.time_budget > 0 else math.inf
        done = n - self.initial
        by_steps = (self.total - n) * elapsed / done if done > 0 else math.inf
        return (by_steps, "steps") if by_steps <= left else (left, "time budget")

    def _eta_text(self, n: int) -> str:
        from tqdm import tqdm

        seconds, why = self.eta(n)
        return f"{tqdm.format_interval(seconds)} ({why})" if math.isfinite(seconds) else "?"

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            shown = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in postfix.items()}
            if self.time_budget > 0:
                shown = {"ETA": self._eta_text(self.bar.n + n), **shown}
            # refresh=False: the postfix is drawn with the next (rate-limited) redraw, not on every step
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)

    def write(self, text: str) -> None:
        """Print ``text`` on its own lines without breaking the bar (stdout when the bar is disabled)."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_report(summary: dict, seconds: float, title: str = "training", target_gain: float | None = None) -> str:
    """The human summary a finished run prints: reward first -> last window (vs ``target_gain`` when given),
    held-out accuracy before -> after, the learning-signal warning if the run had none, the output paths and a
    sample trajectory (``summary`` is :func:`openrlhf_search.trainer.local.train`'s)."""
    nan = float("nan")
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    gain = summary.get("reward_gain", nan)
    w = summary.get("window", 10)
    lines = ["=" * 100,
             f"{title} finished in {seconds / 60:.1f} min ({summary.get('steps_done')} RL steps, "
             f"SFT {(summary.get('sft') or {}).get('seconds', 0):.0f} s, RL {summary.get('rl_seconds', 0):.0f} s)"]
    reward = (f"reward_mean: first {w} steps {summary.get('reward_first_window', nan):.3f} -> last {w} steps "
              f"{summary.get('reward_last_window', nan):.3f} (gain {gain:+.3f}")
    if target_gain is not None:
        reward += f"; target >= +{target_gain}: {'met' if gain >= target_gain else 'NOT met'}"
    lines.append(reward + ")")
    if after:
        improved = "improved" if after.get("f1", 0) > before.get("f1", 0) else "NOT improved"
        lines.append(f"held-out ({after.get('n', 0)} questions, greedy): EM {before.get('em', 0):.3f} -> "
                     f"{after.get('em', 0):.3f}, F1 {before.get('f1', 0):.3f} -> {after.get('f1', 0):.3f}, "
                     f"searches/question {before.get('searches', 0):.2f} -> {after.get('searches', 0):.2f} "
                     f"({improved})")
    else:
        lines.append("held-out: no evaluation questions (data.num_eval = 0 or no data.eval_files)")
    signal = summary.get("learning_signal") or {}
    if signal.get("warning"):
        lines.append(f"WARNING: this run could not learn: {signal['steps_without_signal']} of {signal['steps']} "
                     f"steps had no learning signal; {signal['warning']}")
    out = Path(summary.get("output_dir", "."))
    lines += [f"metrics:     {summary.get('metrics_path')}",
              f"plot:        {summary.get('plot')}",
              f"samples:     {summary.get('samples_dir')}   (openrlhf-search view {out})",
              f"checkpoint:  {summary.get('checkpoint')}",
              f"evaluate:    openrlhf-search eval --model {out}   (the held-out figures above, again)",
              f"tensorboard: tensorboard --logdir {out / 'tb'}"]
    sample = summary.get("final_sample")
    if sample:
        lines.append("-" * 100 + "\nsample trajectory (held-out question, final policy, greedy):\n" + sample)
    lines.append("=" * 100)
    return "\n".join(lines)
