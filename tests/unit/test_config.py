import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from resurgo.trainer.config import JobConfig, load_config


def test_defaults_convert_to_dataclasses():
    cfg = load_config({"parallel": {"pp": 2, "pp_schedule": "Interleaved1F1B"}})
    assert isinstance(cfg, JobConfig)
    assert (cfg.parallel.n_microbatches, cfg.parallel.n_stages_per_rank) == (4, 2)
    assert load_config({"model": {"dim": 768}}).model.hidden_dim == 2048


def test_unknown_keys_and_wrong_types_fail_early():
    with pytest.raises(ConfigKeyError):
        load_config({"parallel": {"tpp": 2}})
    with pytest.raises(ValidationError):
        load_config({"train": {"steps": "many"}})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"parallel": {"pp_schedule": "zigzag"}}, "pp_schedule"),
        ({"train": {"precision": "fp8"}}, "precision"),
        ({"fault": {"keeper": "maybe"}}, "keeper"),
        ({"optim": {"name": "sgd"}}, "adamw"),
        ({"fault": {"erasure": {"parity": 5}}}, "fault.erasure.parity"),
        ({"fault": {"erasure": {"data": "half"}}}, "fault.erasure.data"),
        ({"fault": {"erasure": {"max_mb_s": -1.0}}}, "fault.erasure.max_mb_s"),
        ({"fault": {"erasure": {"encode": "gpu"}}}, "fault.erasure.encode"),
        ({"parallel": {"elastic": "shrink"}}, "parallel.elastic"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(OmegaConf.create(override))
