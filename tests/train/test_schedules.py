"""LR schedules: warmup, cosine, linear, WSD, inverse-sqrt and constant shapes; validation."""
import math

import pytest

from lmstack.config import ConfigError, from_dict
from lmstack.train.optim import SCHEDULES, ScheduleConfig, lr_multiplier


def curve(cfg, total):
    return [lr_multiplier(cfg, s, total) for s in range(total + 1)]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_warmup_is_linear_from_near_zero_to_one(name):
    cfg = ScheduleConfig(name=name, warmup_steps=10)
    warm = [lr_multiplier(cfg, s, 100) for s in range(10)]
    assert warm[0] == pytest.approx(0.1) and warm[-1] == pytest.approx(1.0)
    assert all(b - a == pytest.approx(0.1) for a, b in zip(warm, warm[1:]))
    assert lr_multiplier(cfg, 10, 100) == pytest.approx(1.0, abs=0.05)  # no jump after warmup


def test_cosine_ends_at_min_lr_ratio_and_is_half_a_cosine():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    c = curve(cfg, 110)
    assert c[10] == pytest.approx(1.0) and c[110] == pytest.approx(0.1)
    assert c[60] == pytest.approx(0.55)  # halfway through the decay: the midpoint of 1 and 0.1
    assert all(a >= b for a, b in zip(c[10:], c[11:]))
    assert lr_multiplier(cfg, 500, 110) == pytest.approx(0.1)  # past the end it stays at the floor


def test_linear_decays_in_equal_steps():
    c = curve(ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0), 100)
    assert c[0] == 1.0 and c[50] == pytest.approx(0.5) and c[100] == 0.0
    assert len({round(a - b, 9) for a, b in zip(c, c[1:])}) == 1


def test_wsd_is_flat_then_decays_over_the_final_fraction():
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    c = curve(cfg, 100)
    assert all(v == 1.0 for v in c[10:80])                 # stable phase
    assert c[90] == pytest.approx(0.5) and c[100] == 0.0   # linear decay over the last 20 steps
    assert all(a > b for a, b in zip(c[80:], c[81:]))
    sqrt = curve(ScheduleConfig(name="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_shape="sqrt"), 100)
    assert sqrt[85] == pytest.approx(1 - math.sqrt(0.25))  # 1 - sqrt(progress) cools down faster at first


def test_inverse_sqrt_shape():
    cfg = ScheduleConfig(name="inverse_sqrt", warmup_steps=16)
    assert lr_multiplier(cfg, 63, 1000) == pytest.approx(0.5)   # sqrt(16 / 64)
    assert lr_multiplier(cfg, 255, 1000) == pytest.approx(0.25)
    assert lr_multiplier(cfg, 255, 1000) == lr_multiplier(cfg, 255, 10**6)  # no end point


def test_constant_and_short_runs():
    assert curve(ScheduleConfig(name="constant", warmup_steps=0), 5) == [1.0] * 6
    short = curve(ScheduleConfig(name="cosine", warmup_steps=100), 10)  # warmup longer than the run
    assert short[0] == pytest.approx(0.1) and short[9] == pytest.approx(1.0)


def test_bad_schedule_values_are_named():
    with pytest.raises(ConfigError, match="name='step' is not allowed"):
        ScheduleConfig(name="step")
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        ScheduleConfig(min_lr_ratio=1.5)
    with pytest.raises(ConfigError, match="decay_fraction"):
        from_dict(ScheduleConfig, {"decay_fraction": 0})
    with pytest.raises(ConfigError, match="total_steps"):
        lr_multiplier(ScheduleConfig(), 0, 0)
