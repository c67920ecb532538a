import pytest

from openrlhf_search.algorithms import Registry, get_advantage_estimator, get_policy_loss, register_policy_loss


def test_register_and_get():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and "a" in reg and reg.names() == ["a"] and len(reg) == 1


def test_register_twice_raises():
    reg = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(KeyError, match="already registered"):
        reg.add("a", 2)


def test_unknown_lists_valid_names():
    with pytest.raises(KeyError, match=r"unknown policy loss 'nope'.*dapo.*dspo.*gspo.*ppo.*sapo"):
        get_policy_loss("nope")
    with pytest.raises(KeyError, match=r"grpo.*rloo"):
        get_advantage_estimator("nope")


def test_builtin_policy_loss_cannot_be_shadowed():
    with pytest.raises(KeyError, match="already registered"):
        register_policy_loss("ppo")(lambda **cfg: None)


def test_bad_config_key_is_named():
    with pytest.raises(TypeError, match="clip_lowww"):
        get_policy_loss("ppo", clip_lowww=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        get_policy_loss("ppo", dual_clip=0.5)
    with pytest.raises(ValueError, match="loss_agg"):
        get_policy_loss("ppo", loss_agg="mean")
    with pytest.raises(TypeError, match="grpo"):
        get_advantage_estimator("grpo", epsilon=1.0)
