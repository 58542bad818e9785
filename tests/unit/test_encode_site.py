"""Where shares are scaled: the model's choice follows the measured rates."""

from __future__ import annotations

import pytest
import torch

from resurgo.checkpoint.erasure.share_site import CodingRates, choose_site, decide_site, measure_rates

GB = 1e9


def test_one_parity_needs_no_scaling_anywhere():
    site, why = choose_site("device", m=1, rates=None)
    assert site == "host" and "XOR" in why


def test_without_a_gpu_the_holders_scale():
    assert choose_site("auto", m=2, rates=CodingRates(host_mac=0.5 * GB, host_xor=10 * GB))[0] == "host"


def test_a_fast_host_kernel_keeps_scaling_on_the_holders():
    rates = CodingRates(host_mac=10 * GB, host_xor=12 * GB, d2h=25 * GB, device_scale=2000 * GB)  # ISA-L-like
    site, why = choose_site("auto", m=3, rates=rates)
    assert site == "host" and "2 scaled copies" in why


def test_a_slow_host_kernel_moves_scaling_to_the_device():
    rates = CodingRates(host_mac=0.6 * GB, host_xor=10 * GB, d2h=25 * GB, device_scale=2000 * GB)
    assert choose_site("auto", m=2, rates=rates)[0] == "device"


def test_a_setting_overrides_the_model_and_a_wrong_one_is_refused():
    assert choose_site("device", m=2, rates=None)[0] == "device"
    assert choose_site("host", m=2, rates=CodingRates(0.1 * GB, 10 * GB, 25 * GB, 2000 * GB))[0] == "host"
    with pytest.raises(ValueError, match="encode='gpu' must be one of auto, host, device"):
        choose_site("gpu", m=2, rates=None)


def test_host_rates_are_measured_and_a_cpu_decides_host():
    rates = measure_rates(None, nbytes=2**20)
    assert rates.host_mac > 0 and rates.host_xor > 0 and rates.d2h is None
    assert decide_site("auto", m=2, device=torch.device("cpu"))[0] == "host"
