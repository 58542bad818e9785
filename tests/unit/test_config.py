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
        ({"checkpoint": {"compression": "bogus"}}, "checkpoint.compression='bogus' is not known"),
        ({"fault": {"hang_timeout_s": -1.0}}, "fault.hang_timeout_s"),
        ({"fault": {"keeper_lease_s": 0.0}}, "fault.keeper_lease_s"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(OmegaConf.create(override))


def test_a_user_error_is_one_clear_message_without_a_traceback(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "resurgo.launch.train", "model.dim=63", f"run.root={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == "error: model.dim=63 must be divisible by model.n_heads=4", proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    debug = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**__import__("os").environ, "RESURGO_DEBUG": "1"},
    )
    assert debug.returncode == 1 and "model.dim=63" in debug.stderr and "Traceback" in debug.stderr
