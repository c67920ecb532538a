"""The trajectory viewer: rollout records, sampling, the static report, and the page in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_search.env.trajectory import Trajectory, TurnRecord
from openrlhf_search.viewer.records import read_records, trajectory_record, write_records
from openrlhf_search.viewer.report import ViewerError, build_report, load_run

REPO = Path(__file__).resolve().parents[2]


class CharTokenizer:
    """One character per token: decode(ids) = the characters (enough to check token pieces)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def _traj(text_model: str, text_obs: str, answer: str, group: str, k: int, golds=("Paris",)) -> Trajectory:
    t = Trajectory(prompt_ids=[1, 2], meta={"question": f"Where is {group}?", "golden_answers": list(golds),
                                            "group_id": group, "rollout_index": k})
    s, e = t.append([ord(c) for c in text_model], is_model=True, logprobs=[-0.5] * len(text_model))
    turn = TurnRecord(index=0, model_span=(s, e), action="search", text=text_model, queries=["where"])
    turn.obs_span = t.append([ord(c) for c in text_obs], is_model=False)
    turn.obs_text, turn.doc_ids = text_obs, ["d1"]
    t.turns.append(turn)
    a = f"<answer>{answer}</answer>"
    s, e = t.append([ord(c) for c in a], is_model=True)
    t.turns.append(TurnRecord(index=1, model_span=(s, e), action="answer", text=a))
    t.answer, t.finish_reason = answer, "answer"
    return t


def _run_dir(tmp_path: Path, steps=(1, 2), groups=3, per_group=2) -> Path:
    run = tmp_path / "run"
    tok = CharTokenizer()
    for step in steps:
        recs = []
        for g in range(groups):
            for k in range(per_group):
                good = k == 0
                t = _traj("<search>where</search>", "<information>Doc: the city of Paris</information>",
                          "Paris" if good else "Rome", f"g{g}", k)
                n = len(t.response_ids)
                ratios = [0.3 if (i == 2 and good) else 1.0 for i in range(n)]  # one drifted token per good sample
                recs.append(trajectory_record(t, tok, step=step, reward=1.0 if good else 0.0,
                                              reward_info={"f1": 1.0 if good else 0.0},
                                              advantages=[0.7 if good else -0.7] * n, ratios=ratios))
        write_records(run / "rollouts" / f"step_{step:06d}.jsonl", recs)
    with open(run / "metrics.jsonl", "w") as fh:
        for step in steps:
            fh.write(json.dumps({"step": step, "reward_mean": 0.5 + 0.1 * step, "loss/drift_share": 0.01}) + "\n")
    return run


def test_trajectory_record_fields_align_with_the_response():
    t = _traj("<search>q</search>", "<information>x</information>", "Paris", "g", 0)
    rec = trajectory_record(t, CharTokenizer(), step=3, reward=1.0, advantages=[0.5] * len(t.response_ids))
    assert "".join(rec["tokens"]) == "<search>q</search><information>x</information><answer>Paris</answer>"
    assert len(rec["mask"]) == len(rec["tokens"]) == len(rec["adv"])
    obs = "<information>x</information>"
    start = rec["tokens"].index("<") + len("<search>q</search>")
    assert rec["mask"][start : start + len(obs)] == [0] * len(obs)  # retrieved tokens are masked
    assert rec["turns"][0]["queries"] == ["where"] and rec["answer"] == "Paris" and rec["step"] == 3
    json.dumps(rec, allow_nan=False)  # serialisable as is


def test_torn_last_line_is_skipped_and_a_bad_middle_line_is_named(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"question": "a", "turns": [], "tokens": []}\n{"question": "b", "tur')
    assert [r["question"] for r in read_records(p)] == ["a"]
    p.write_text('{"question": "a"}\nnot json\n{"question": "c"}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:2"):
        read_records(p)


def test_sampling_keeps_whole_groups_and_the_caps(tmp_path):
    run = _run_dir(tmp_path, steps=(1, 2, 3, 4), groups=5, per_group=2)
    data = load_run(run, max_per_step=4, max_total=12)
    assert data["records_total"] == 40 and len(data["records"]) <= 12
    by = {}
    for r in data["records"]:
        by.setdefault((r["step"], r["group"]), []).append(r)
    assert all(len(v) == 2 for v in by.values())  # a group is never cut in half
    assert {r["step"] for r in data["records"]} == {1, 2, 3, 4}  # every step is represented


def test_report_is_self_contained_and_escapes_model_text(tmp_path):
    run = _run_dir(tmp_path)
    # a model that writes HTML must not be able to break out of the embedded JSON
    write_records(run / "rollouts" / "step_000009.jsonl", [trajectory_record(
        _traj("</script><script>alert(1)</script>", "<information>x</information>", "x", "evil", 0), CharTokenizer(),
        step=9, reward=0.0)])
    out = build_report(run)
    html = out.read_text()
    page_only = html.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace is a name, not a fetch
    assert "http://" not in page_only and "https://" not in page_only  # no CDN, nothing fetched
    assert html.count("</script>") == 2  # only the page's own two script elements close
    data = json.loads(html.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert any("alert(1)" in r["turns"][0]["text"] for r in data["records"])


def test_missing_or_empty_run_dir_is_one_clear_error(tmp_path):
    with pytest.raises(ViewerError, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    res = subprocess.run([sys.executable, "-m", "openrlhf_search", "view", str(tmp_path / "empty")],
                         capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert res.returncode == 2 and "metrics.jsonl" in res.stderr and "Traceback" not in res.stderr


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_in_a_headless_browser(tmp_path):
    """The page loads without console errors, a trajectory opens, masked tokens look different, filters work."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra has it)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    run = _run_dir(tmp_path)
    out = build_report(run)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(out.as_uri())
            assert page.locator("tr.row").count() == 12
            assert page.locator(".chart").count() == 2  # reward_mean and loss/drift_share were logged
            page.click("tr.row >> nth=0")
            page.wait_for_selector("#token-view")
            model, obs = page.locator("#token-view .tok.model"), page.locator("#token-view .tok.obs")
            assert obs.count() == len("<information>Doc: the city of Paris</information>")
            assert model.count() == len("<search>where</search>") + len("<answer>Paris</answer>")
            style = "e => getComputedStyle(e).backgroundColor + '|' + getComputedStyle(e).fontStyle"
            assert model.first.evaluate(style) != obs.first.evaluate(style)
            assert page.locator("#token-view .tok.drift").count() == 1  # ratio 0.3 <= t = 0.5 is marked
            assert page.locator(".passages mark").first.inner_text() == "Paris"  # golden answer highlighted
            page.select_option("#colour-mode", "adv")
            assert "rgba(22, 163, 74" in page.locator("#token-view .tok.model").first.evaluate(
                "e => getComputedStyle(e).backgroundColor")  # positive advantage in green
            page.fill("#f-rmin", "0.5")  # filter: only the correct samples
            assert page.locator("tr.row").count() == 6
            page.fill("#f-rmin", "")
            page.fill("#f-text", "g1?")
            assert page.locator("tr.row").count() == 4
            assert errors == []
        finally:
            browser.close()
