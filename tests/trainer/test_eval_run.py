"""Issue 24: `openrlhf-search eval` starting from a training run.

`eval --model RUN_DIR` (or `<run>/checkpoints/latest`, or a checkpoint directory) with no `--data` rebuilds the run's
held-out set, retriever and template from its saved config and gives exactly the trainer's final held-out figures,
in the trainer's units (fractions), written beside the run; the README's eval commands work as written; eval sleeps
in OpenMP barriers (`OMP_WAIT_POLICY=PASSIVE`) as `train` does.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "examples" / "configs" / "smoke.yaml")
SCORES = ("n", "em", "subem", "f1", "turns", "searches", "answered", "valid_format", "retrieval_hit")


def _env(**extra):
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO), **extra)
    return env


def _cli(*args, timeout=240, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "openrlhf_search", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or _env(), cwd=str(cwd or REPO))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A seconds-long smoke run (3 steps; 6 held-out questions of a test split that holds many more)."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    res = _cli("train", "--config", SMOKE, f"logging.output_dir={out}", "steps=3", "logging.save_every=0",
               "data.num_eval=6")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _expected_row(after: dict, name: str = "held_out") -> str:
    """The table row of the trainer's own figures, in its units (fractions to 3 decimals)."""
    a = after
    return (f"| {name} | {a['n']} | {a['em']:.3f} | {a['subem']:.3f} | {a['f1']:.3f} | {a['turns']:.2f} | "
            f"{a['searches']:.2f} | {a['answered']:.3f} | {a['valid_format']:.3f} | {a['retrieval_hit']:.3f} |")


def test_eval_of_a_run_directory_reproduces_the_trainers_final_heldout_figures(run_dir):
    """Reproduced by: `eval --model runs/quickstart` (no such checkpoint; with the step's directory it needed --data
    and --retriever again, scored the whole 240-question test file instead of the run's 64, printed percent)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    after = summary["eval_after"]
    test_questions = (run_dir / "data" / "test.jsonl").read_text().splitlines()
    assert after["n"] == 6 < len(test_questions)  # the run's held-out set is a prefix of a larger test file
    res = _cli("eval", "--model", str(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    out = run_dir / "eval" / Path(summary["checkpoint"]).name / "held_out"  # beside the run
    got = json.loads((out / "results.json").read_text())["datasets"][0]
    for k in SCORES:
        assert got[k] == after[k], k  # exactly, in the same units
    # the same questions, the same greedy text, turn by turn: the rollout rows are byte-identical
    assert (out / "rollouts.jsonl").read_bytes() == (run_dir / "eval_after_rollouts.jsonl").read_bytes()
    assert _expected_row(after) in res.stdout.splitlines()  # the table is in fractions, like the trainer's
    assert "reproduced exactly" in res.stdout
    assert "template=search_r1_compact" in res.stdout
    assert "Loading weights" not in res.stderr + res.stdout  # transformers' loading bar: noise, as in `train`


@pytest.mark.parametrize("which", ["latest", "checkpoint"])
def test_eval_takes_checkpoints_latest_and_a_checkpoint_directory(run_dir, tmp_path, which):
    """Reproduced by: `eval --model runs/x/checkpoints/latest` (a text file: "not a directory" traceback)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    model = run_dir / "checkpoints" / "latest" if which == "latest" else Path(summary["checkpoint"])
    res = _cli("eval", "--model", str(model), "--output-dir", str(tmp_path / "e"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "e" / "results.json").read_text())["datasets"][0]
    assert {k: got[k] for k in SCORES} == {k: summary["eval_after"][k] for k in SCORES}


def test_eval_refuses_what_it_cannot_rebuild_with_one_line(run_dir, tmp_path):
    cases = [
        (["--model", str(run_dir / "metrics.jsonl")], "is a file, not a model"),
        (["--model", str(tmp_path / "nowhere")], "no such directory"),
        (["--model", str(tmp_path)], "neither a run directory"),
    ]
    lone = tmp_path / "lone"  # a checkpoint copied out of its run: no held-out set to rebuild
    import shutil

    shutil.copytree(json.loads((run_dir / "summary.json").read_text())["checkpoint"], lone)
    (lone / "run_config.yaml").unlink()
    cases.append((["--model", str(lone)], "--data is required"))
    empty = tmp_path / "emptyrun"
    (empty / "checkpoints").mkdir(parents=True)
    cases.append((["--model", str(empty)], "no complete checkpoint"))
    early = tmp_path / "stopped"  # a run stopped during its warm start: set-up outputs, no checkpoints/ yet
    early.mkdir()
    (early / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    cases.append((["--model", str(early)], "no complete checkpoint"))
    for args, msg in cases:
        res = _cli("eval", *args, "--output-dir", str(tmp_path / "out"), timeout=120)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert msg in res.stderr and "Traceback" not in res.stderr, (args, res.stderr[-2000:])
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def _readme_eval_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    cmds = [ln.split("#")[0].strip() for ln in text.splitlines() if ln.strip().startswith("openrlhf-search eval ")]
    assert cmds, "the README shows no eval command"
    return cmds


def test_the_readmes_eval_commands_work_as_written(run_dir, tmp_path):
    """Reproduced by: the README's `eval --model runs/quickstart/checkpoint ...` (no such directory: traceback)."""
    cmds = _readme_eval_commands()
    assert "openrlhf-search eval --model runs/quickstart" in cmds, cmds  # the run's own figures, no other flag
    work = tmp_path / "w"
    (work / "runs").mkdir(parents=True)
    os.symlink(run_dir, work / "runs" / "quickstart")  # the README's paths, relative to where the user is
    rows = (run_dir / "data" / "test.jsonl").read_text().splitlines()[:3]
    for cmd in cmds:  # the Search-R1 test sets a command names: three of the run's questions each, FlashRAG layout
        argv = shlex.split(cmd)
        if "--data" in argv:
            names = argv[argv.index("--data") + 1:]
            names = names[: next((i for i, a in enumerate(names) if a.startswith("--")), len(names))]
            data_dir = work / argv[argv.index("--data-dir") + 1]
            for name in names:
                (data_dir / name).mkdir(parents=True, exist_ok=True)
                (data_dir / name / "test.jsonl").write_text("\n".join(rows) + "\n")
    for cmd in cmds:
        argv = shlex.split(cmd)[1:]
        # a retrieval server in the README is the run's own index here (serving it is tested in tests/retrieval)
        argv = [str(run_dir / "index") if a.startswith("http://") else a for a in argv]
        res = _cli(*argv, cwd=work)
        assert res.returncode == 0, (cmd, res.stderr[-3000:])
    after = json.loads((run_dir / "summary.json").read_text())["eval_after"]
    ckpt = Path(json.loads((run_dir / "summary.json").read_text())["checkpoint"]).name
    got = json.loads((run_dir / "eval" / ckpt / "held_out" / "results.json").read_text())["datasets"][0]
    assert got["f1"] == after["f1"] and got["n"] == after["n"]
    assert [r["dataset"] for r in json.loads((run_dir / "eval" / ckpt / "nq+hotpotqa" / "results.json").read_text())[
        "datasets"]] == ["nq", "hotpotqa"]


SPY = """
import os, sys
class _Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "SPY_SEEN" not in os.environ:
            os.environ["SPY_SEEN"] = "1"
            print("OMP_WAIT_POLICY at torch import:", os.environ.get("OMP_WAIT_POLICY", "<unset>"), file=sys.stderr)
        return None
sys.meta_path.insert(0, _Spy())
from openrlhf_search.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_eval_sets_omp_passive_before_torch_is_imported(run_dir, tmp_path):
    """Reproduced by: `eval` on SmolLM2, 3.6 tokens/s vs 15.8 with OMP_WAIT_POLICY=PASSIVE (which `train` sets)."""
    env = _env()
    env.pop("OMP_WAIT_POLICY", None)
    res = subprocess.run([sys.executable, "-c", SPY, "eval", "--model", str(run_dir), "--output-dir",
                          str(tmp_path / "e")], capture_output=True, text=True, timeout=240, env=env, cwd=str(REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OMP_WAIT_POLICY at torch import: PASSIVE" in res.stderr, res.stderr[-2000:]


def test_eval_scores_format_validity_and_retrieval_hits_as_the_reward_sees_them(tmp_path):
    """Reproduced by: eval reported neither format validity nor retrieval hits (the trainer's smoke model scores 0 on
    both, so they are checked here on scripted answers)."""
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.rewards import get_reward_fn
    from openrlhf_search.rollout.base import Generation, SamplingParams
    from openrlhf_search.rollout.runner import run_rollouts
    from openrlhf_search.trainer.config import load_config
    from openrlhf_search.trainer.evaluate import score_rollouts
    from openrlhf_search.trainer.local import build_env, build_retriever, load_questions, score_trajectories

    class Scripted:
        def __init__(self, tok, texts):
            self.tok, self.texts = tok, list(texts)

        def generate(self, prompts, params, row_max_new_tokens=None):
            ids = self.tok.encode(self.texts.pop(0), add_special_tokens=False)
            return [Generation(ids, [-0.1] * len(ids), "stop") for _ in prompts]

    cfg = load_config(None, ["data.num_entities=20", "env.template=search_r1_compact", "env.max_obs_tokens=200",
                             "retriever.topk=1"])
    train, _, kb = load_questions(cfg, tmp_path)
    tok = build_tiny_tokenizer([d.contents for d in kb.corpus] * 2, vocab_size=600)
    env = build_env(cfg, tok, build_retriever(cfg, tmp_path, kb))
    q = next(s for s in train if s.metadata["hops"] == 1)  # its one passage holds the answer
    subject, gold = q.metadata["subject"], q.golden_answers[0]
    scripts = [[f"<search>{subject}</search>", f"<answer>{gold}</answer>"],  # searched, found, valid
               [f"<answer>{gold}</answer>"],  # valid, nothing retrieved
               [f"I think <answer>{gold}</answer>"]]  # text outside the blocks: invalid
    trajs = [run_rollouts(Scripted(tok, s), env, [q], 1, SamplingParams(max_new_tokens=40))[0] for s in scripts]
    got = score_rollouts(trajs)
    infos = score_trajectories(trajs, get_reward_fn(cfg.env.reward), tok)[1]
    assert [i["valid_format"] for i in infos] == [True, True, False]
    assert [i["retrieval_hit"] for i in infos] == [True, False, False]
    assert got["valid_format"] == pytest.approx(2 / 3) and got["retrieval_hit"] == pytest.approx(1 / 3)
    assert got["em"] == pytest.approx(1.0) and got["searches"] == pytest.approx(1 / 3)


def test_the_held_out_set_of_a_files_run_is_the_trainers(tmp_path):
    """A run on the user's own files: eval takes the first data.num_eval questions of data.eval_files, read as the
    trainer reads them (the question-length rule included), not the whole file."""
    from openrlhf_search.trainer.config import load_config
    from openrlhf_search.trainer.evaluate import run_held_out_set
    from openrlhf_search.trainer.local import load_questions

    rows = [{"id": f"q{i}", "question": f"Who is person {i}?" + (" and more" * 40 if i == 1 else ""),
             "golden_answers": [f"P{i}"]} for i in range(7)]
    f = tmp_path / "test.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["data.source=files", f"data.train_files=[{f}]", f"data.eval_files=[{f}]",
                             "data.num_eval=4", "data.max_question_chars=100", "data.long_questions=truncate"])
    got = run_held_out_set(cfg, tmp_path / "run")
    want = load_questions(cfg, tmp_path / "out")[1]
    assert [(s.id, s.question) for s in got] == [(s.id, s.question) for s in want]
    assert len(got) == 4 and len(got[1].question) <= 100
    empty = load_config(None, ["data.source=files", f"data.train_files=[{f}]"])
    with pytest.raises(ValueError, match="no held-out set"):
        run_held_out_set(empty, tmp_path / "run")
