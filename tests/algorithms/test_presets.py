import pytest

from openrlhf_search.algorithms import get_algorithm, get_policy_loss


@pytest.mark.parametrize(
    "name, estimator, loss, dyn, calib",
    [
        ("grpo", "grpo", "grpo", False, False),
        ("dr_grpo", "dr_grpo", "grpo", False, False),
        ("dapo", "grpo", "dapo", True, False),
        ("gspo", "grpo", "gspo", False, False),
        ("dspo", "grpo", "dspo", True, False),
        ("sapo", "grpo", "sapo", False, False),
        ("calibadv", "grpo", "grpo", False, True),
        ("dspo+calibadv", "grpo", "dspo", True, True),
        ("calibadv+sapo", "grpo", "sapo", False, True),
        ("sapo+filter", "grpo", "sapo", True, False),
    ],
)
def test_presets(name, estimator, loss, dyn, calib):
    p = get_algorithm(name)
    assert (p.advantage_estimator, p.policy_loss, p.dynamic_filter, p.calibadv) == (estimator, loss, dyn, calib)
    fn = p.build_loss()
    assert callable(fn) and callable(p.build_estimator())


def test_preset_loss_configs():
    assert get_algorithm("dapo").loss_cfg["clip_high"] == 0.28
    assert get_algorithm("dspo").build_loss().config.ratio_level == "sequence"
    assert get_algorithm("dr_grpo").loss_cfg["loss_agg"] == "seq-mean-token-sum-norm"
    assert get_algorithm("sapo+calibadv").loss_cfg["sapo_coef"] > 0
    assert get_algorithm("calibadv+sapo").name == "sapo+calibadv"
    assert get_algorithm("grpo").build_loss(clip_high=0.3).config.clip_high == 0.3
    assert get_algorithm("grpo").build_loss().config == get_policy_loss("grpo").config


def test_preset_errors():
    with pytest.raises(KeyError, match="valid components"):
        get_algorithm("dpo")
    with pytest.raises(ValueError, match="at most one base"):
        get_algorithm("gspo+sapo")
    with pytest.raises(ValueError, match="repeated"):
        get_algorithm("sapo+sapo")
    with pytest.raises(ValueError, match="empty"):
        get_algorithm("sapo+")
