"""The offload performance model against simulated costs: the split it picks follows the costs and
minimises the modelled step time."""

from __future__ import annotations

import itertools

import pytest

from resurgo.trainer.offload_model import Costs, choose, spread, step_time

GB = 1e9
SIZES = [16_000_000] * 8  # 64 MiB subgroups of fp32 master weights


def costs(*, link: float, free: float = 80 * GB, cpu: float = 1e9, device: float = 50e9, shared: bool = False) -> Costs:
    return Costs(
        h2d_bytes_per_s=link,
        d2h_bytes_per_s=link,
        cpu_elems_per_s=cpu,
        device_elems_per_s=device,
        free_device_bytes=free,
        shared=shared,
    )


def test_slow_link_keeps_everything_on_the_cpu():
    plan = choose(SIZES, costs(link=0.5 * GB))
    assert plan.device_count == 0


def test_fast_link_and_free_memory_put_more_on_the_device():
    slow, fast = choose(SIZES, costs(link=4 * GB)), choose(SIZES, costs(link=50 * GB))
    assert fast.device_count > slow.device_count
    assert fast.device_count > 0
    assert fast.modelled_s < step_time(SIZES, spread(len(SIZES), 0), costs(link=50 * GB))


def test_no_room_for_staging_buffers_means_none_on_the_device():
    assert choose(SIZES, costs(link=50 * GB, free=1e6)).device_count == 0


def test_device_that_is_the_cpu_gains_nothing():
    assert choose(SIZES, costs(link=10 * GB, device=1e9, shared=True)).device_count == 0


@pytest.mark.parametrize("link", [1 * GB, 8 * GB, 25 * GB, 64 * GB])
@pytest.mark.parametrize("cpu", [0.3e9, 2e9])
def test_chosen_split_minimises_the_modelled_time(link, cpu):
    """Among every subset of subgroups, none is modelled faster; with many subgroups, no count."""
    c = costs(link=link, cpu=cpu)
    sizes = [4_000_000, 16_000_000, 16_000_000, 8_000_000, 16_000_000, 1_000_000]
    plan = choose(sizes, c)
    best = min(step_time(sizes, list(layout), c) for layout in itertools.product([False, True], repeat=len(sizes)))
    assert plan.modelled_s == pytest.approx(best, rel=1e-12)
    many = [16_000_000] * 40 + [3_000_000]
    plan = choose(many, c)
    assert plan.modelled_s == min(step_time(many, spread(len(many), k), c) for k in range(len(many) + 1))


def test_fixed_fraction_overrides_the_model():
    plan = choose(SIZES, costs(link=0.5 * GB), fraction=0.5)
    assert plan.device_count == 4
    assert plan.on_device == [False, True] * 4


def test_transfers_hide_behind_cpu_work():
    """With a fast device, a step that splits the work is shorter than all on the CPU and all on the device."""
    c = costs(link=25 * GB, cpu=1e9)
    plan = choose(SIZES, c)
    assert 0 < plan.device_count < len(SIZES)
    all_cpu = step_time(SIZES, [False] * 8, c)
    all_dev = step_time(SIZES, [True] * 8, c)
    assert plan.modelled_s < min(all_cpu, all_dev)
