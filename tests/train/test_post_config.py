"""Post-training settings that cannot run are refused when the config is loaded, naming the field and the fix."""
import pytest

from dsv3_jax.errors import ConfigError
from dsv3_jax.train import load_run_config


@pytest.mark.parametrize("over, needle", [
    (["objective=rl"], "train.objective='rl': must be one of"),
    (["objective=sft"], "train.init_from=''"),
    (["objective=grpo"], "train.objective=grpo needs a checkpoint"),
    (["objective=distill"], "train.teacher=''"),
    (["objective=grpo", "init_from=x", "group_size=1"], "at least 2 samples"),
    (["objective=grpo", "init_from=x", "temperature=0"], "temperature > 0"),
    (["kl_coef=-1"], "train.kl_coef=-1.0"),
    (["policy_updates=0"], "train.policy_updates=0"),
    (["lr_schedule=cosine"], "must be one of"),
])
def test_bad_post_training_settings(over, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        load_run_config("tiny", over)


def test_good_post_training_settings():
    run = load_run_config("grpo_demo", ["train.init_from=x"])
    assert run.train.objective == "grpo" and run.train.group_size == 8
    assert load_run_config("sft_demo").train.lr_schedule == "finetune"
