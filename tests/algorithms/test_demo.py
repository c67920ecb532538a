import argparse

from openrlhf_search.algorithms import demo


def test_demo_runs_and_prints_a_table(capsys):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--steps", "6", "--seeds", "1", "--algorithms", "grpo,dspo,sapo+calibadv"])
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.split() and ln.split()[0] in ("grpo", "dspo", "sapo+calibadv")]
    assert len(lines) == 3
    for ln in lines:
        cells = [float(x) for x in ln.split()[1:]]
        assert 0.0 <= cells[0] <= 1.0 and cells[6] > 0  # reward_all in [0, 1]; samples drawn


def test_demo_rejects_unknown_algorithm():
    import pytest

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    with pytest.raises(SystemExit, match="--algorithms 'nope'.*valid components"):
        demo.run(parser.parse_args(["--algorithms", "nope"]))
