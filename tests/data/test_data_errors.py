"""Issue 16, data: every data error is one line naming file, line and field; exit 2 from the CLI, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_search.data.formats import DatasetFormatError, limit_question_length, read_dataset

REPO = Path(__file__).resolve().parents[2]


def _row(q="Where was Zorvan Kelt born?", golds=("Mirabel",)) -> str:
    return json.dumps({"id": "x", "question": q, "golden_answers": list(golds)})


def test_non_utf8_line_is_located(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes((_row() + "\n").encode() + b'{"id": "2", "question": "caf\xe9?", "golden_answers": ["a"]}\n')
    with pytest.raises(DatasetFormatError, match=r"d.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 29\)"):
        read_dataset(p)


def test_empty_file_is_a_clear_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DatasetFormatError, match="empty.jsonl: the file holds no rows"):
        read_dataset(p)


@pytest.mark.parametrize("golds", [[""], ["Mirabel", "  "]])
def test_empty_golden_answer_is_refused(tmp_path, golds):
    """An empty golden answer scored EM 1 for an empty answer."""
    p = tmp_path / "d.jsonl"
    p.write_text(_row() + "\n" + _row(golds=golds) + "\n")
    with pytest.raises(DatasetFormatError, match=r"d.jsonl:2: field 'golden_answers' item \d is empty"):
        read_dataset(p)


def test_long_questions_refused_truncated_or_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(_row() + "\n" + _row(q="x" * 5000) + "\n")
    samples = read_dataset(p)
    with pytest.raises(DatasetFormatError, match=r"d.jsonl: question 'x' \(row 2\) has 5000 characters"):
        limit_question_length(samples, str(p), 4000, "refuse")
    cut, n = limit_question_length(samples, str(p), 4000, "truncate")
    assert n == 1 and [len(s.question) for s in cut] == [len(samples[0].question), 4000]
    kept, n = limit_question_length(samples, str(p), 4000, "skip")
    assert n == 1 and len(kept) == 1
    assert limit_question_length(samples, str(p), 0, "refuse") == (samples, 0)


def _train(tmp_path, *overrides):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "openrlhf_search", "train", "--config",
                           str(REPO / "examples" / "configs" / "smoke.yaml"), f"logging.output_dir={tmp_path / 'run'}",
                           # a retriever is required with data.source=files (validated before the data is read);
                           # a URL is not contacted before the data is loaded. The config check refuses the tiny
                           # random-init model and the synthetic warm start on user data: an existing directory
                           # stands for a pretrained model (the data is read before any model is loaded)
                           "data.source=files", "retriever.spec=http://127.0.0.1:9", f"model.path={tmp_path}",
                           "sft.steps=0", "sft.copy_steps=0", "sft.demo_worlds=0", *overrides], capture_output=True,
                          text=True, timeout=120, env=env,
                          cwd=str(REPO))


def test_train_data_errors_exit_2_with_one_line(tmp_path):
    """Reproduced by: `train data.source=files data.train_files=[bad.jsonl]` (a traceback after the message; a 1 MB
    question allocated 68 GB at step 2)."""
    big = tmp_path / "big.jsonl"
    big.write_text(_row() + "\n" + _row(q="why " * 250_000) + "\n")
    res = _train(tmp_path, f"data.train_files=[{big}]", f"data.eval_files=[{big}]")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()[-1]
    assert str(big) in err and "row 2" in err and "data.long_questions" in err

    res = _train(tmp_path, f"data.train_files=[{tmp_path / 'missing.jsonl'}]")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "data.train_files" in res.stderr and "missing.jsonl" in res.stderr
