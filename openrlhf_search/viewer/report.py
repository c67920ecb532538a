"""``openrlhf-search view RUN_DIR``: a self-contained static HTML report of a run's trajectories and curves.

What it reads (whatever of it exists; local and OpenRLHF runs alike):

* ``metrics.jsonl`` -- one JSON object per step (reward, ratio quantiles, clip fractions, drift share, staleness...);
* ``rollouts/*.jsonl`` -- rollout records (:mod:`.records`): the local trainer's ``step_N.jsonl`` and the OpenRLHF
  agent's ``agent_<pid>.jsonl``;
* ``summary.json`` / ``config.yaml`` -- shown as the run's header.

The page is one file: data embedded as JSON, styles and script inline, no CDN, no server (it opens from disk;
``--serve`` only serves it on loopback for remote machines with a port forward). Big runs stay fast: at most
``max_per_step`` trajectories per step (whole groups, evenly sampled) and ``max_total`` overall are embedded, the list
is paginated, and a trajectory's token view is only built when it is opened.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from openrlhf_search.viewer.records import ROLLOUTS_DIR, read_records

__all__ = ["build_report", "load_run", "ViewerError"]

CURVE_KEYS = (
    "reward_mean", "eval/f1", "loss/ratio_p01", "loss/ratio_p50", "loss/ratio_p99", "loss/clip_frac_low",
    "loss/clip_frac_high", "loss/drift_share", "loss/sapo_token_share", "update/grad_norm", "filter/keep_ratio",
    "searches_per_traj", "rollout/engine_logprob_gap", "async/staleness_mean", "async/learner_idle_share",
)
"""Metrics drawn as curves when the run logged them (others are listed in the metric picker)."""


class ViewerError(ValueError):
    """A run directory the viewer cannot read (the message names the file)."""


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                break  # torn last line (a crash mid-write): ignore
            raise ViewerError(f"{path}:{i}: not a JSON line") from None
    return rows


def _sample(records: list[dict], max_per_step: int, max_total: int, seed: int) -> tuple[list[dict], int]:
    """Whole groups, evenly over steps: at most ``max_per_step`` records per step and ``max_total`` in all."""
    by_step: dict[Any, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_step[r.get("step")][r.get("group", "")].append(r)
    rng = random.Random(seed)
    steps = sorted(by_step, key=lambda s: (s is None, s if s is not None else 0))
    per_step = max(1, min(max_per_step, max_total // max(1, len(steps))))
    kept = []
    for s in steps:
        groups = list(by_step[s].values())
        rng.shuffle(groups)
        chosen: list[dict] = []
        for g in groups:
            if chosen and len(chosen) + len(g) > per_step:
                continue
            chosen.extend(g)
        chosen.sort(key=lambda r: (str(r.get("group", "")), r.get("index") or 0))
        kept.extend(chosen)
    return kept[:max_total], len(records)


def load_run(run_dir: str | Path, max_per_step: int = 64, max_total: int = 4000, seed: int = 0) -> dict:
    """Everything the page shows, as one JSON-serialisable dict."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ViewerError(f"{run}: no such run directory")
    metrics = _read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    rollout_files = sorted((run / ROLLOUTS_DIR).glob("*.jsonl")) if (run / ROLLOUTS_DIR).is_dir() else []
    records: list[dict] = []
    for f in rollout_files:
        try:
            records.extend(read_records(f))
        except ValueError as exc:
            raise ViewerError(str(exc)) from None
    if not metrics and not records:
        raise ViewerError(f"{run}: neither metrics.jsonl nor {ROLLOUTS_DIR}/*.jsonl found (is this a run directory? "
                          "local runs write rollouts every logging.rollout_every steps)")
    kept, total = _sample(records, max_per_step, max_total, seed)
    summary = {}
    if (run / "summary.json").is_file():
        try:
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            summary = {"note": "summary.json is not valid JSON"}
    config = (run / "config.yaml").read_text(encoding="utf-8") if (run / "config.yaml").is_file() else ""
    sapo_t = 0.5
    for line in config.splitlines():  # the run's SAPO threshold, if it overrode the default
        if line.strip().startswith("sapo_threshold:"):
            try:
                sapo_t = float(line.split(":", 1)[1])
            except ValueError:
                pass
    keys = sorted({k for row in metrics for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})
    return {
        "run": str(run.resolve().name), "summary": summary, "config": config, "metrics": metrics,
        "metric_keys": keys, "curve_keys": [k for k in CURVE_KEYS if k in keys], "records": kept,
        "records_total": total, "sapo_threshold": sapo_t,
    }


def _embed(data: dict) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</script>``, no HTML comment openers)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_report(run_dir: str | Path, out: str | Path | None = None, **kw) -> Path:
    """Write the report (default ``<run_dir>/report.html``) and return its path."""
    data = load_run(run_dir, **kw)
    out = Path(out) if out else Path(run_dir) / "report.html"
    template = (Path(__file__).parent / "report.html").read_text(encoding="utf-8")
    out.write_text(template.replace("/*__DATA__*/{}", _embed(data)), encoding="utf-8")
    return out


def serve(path: Path, port: int = 0) -> None:
    """Serve ``path``'s folder on 127.0.0.1 (loopback only) until Ctrl-C."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as httpd:
        print(f"serving http://127.0.0.1:{httpd.server_address[1]}/{path.name}  (Ctrl-C to stop)", flush=True)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass


def add_arguments(ap) -> None:
    """``openrlhf-search view`` arguments."""
    ap.add_argument("run_dir", help="a run directory (logging.output_dir of a local run, or an OpenRLHF run's)")
    ap.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")
    ap.add_argument("--max-per-step", type=int, default=64, help="trajectories embedded per step (whole groups)")
    ap.add_argument("--max-total", type=int, default=4000, help="trajectories embedded in all")
    ap.add_argument("--serve", action="store_true", help="serve the report on 127.0.0.1 after writing it")
    ap.add_argument("--port", type=int, default=0, help="port for --serve (0 = any free port)")


def run(args) -> int:
    """Write the report; errors are one line naming the file, exit 2."""
    import sys

    if args.max_per_step < 1 or args.max_total < 1:
        print("openrlhf-search view: --max-per-step and --max-total must be >= 1", file=sys.stderr)
        return 2
    try:
        path = build_report(args.run_dir, args.out, max_per_step=args.max_per_step, max_total=args.max_total)
    except ViewerError as exc:
        print(f"openrlhf-search view: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}  (open it in a browser; no server needed)")
    if args.serve:
        serve(path, args.port)
    return 0
