"""Reward functions whose return values are wrong: where TRL 1.16 refuses them, grpo does too; where TRL trains on
silently (a NaN taken as None, an infinite reward), grpo stops with an error that names the function. What reward
functions receive when all is well is compared in test_parity_training.py."""

from __future__ import annotations

import pytest
from parity import Case

BOTH_REFUSE = {
    "wrong-length": ("one_short", "one_short"),
    "not-a-number": ("text", "text"),
}

# TRL trains on; grpo names the function and says what is wrong.
GRPO_REFUSES = {
    "nan-reward-trl-takes-as-none": ("nan", "reward function 'nan'"),
    "inf-reward-trl-trains-on": ("inf", "reward function 'infinite'"),
}


@pytest.mark.parametrize("reward, name", BOTH_REFUSE.values(), ids=BOTH_REFUSE.keys())
def test_both_refuse(run_both, reward, name):
    trl, grpo = run_both(Case(rewards=(reward,))).values()
    assert trl.refused_at == grpo.refused_at == "train"
    assert name in grpo.error, grpo.error


@pytest.mark.parametrize("reward, message", GRPO_REFUSES.values(), ids=GRPO_REFUSES.keys())
def test_grpo_stops_where_trl_trains_on(run_both, reward, message):
    trl, grpo = run_both(Case(rewards=(reward,))).values()
    assert trl.refused_at is None, f"TRL refuses it now too ({trl.error}): move the case to BOTH_REFUSE"
    assert grpo.refused_at == "train" and message in grpo.error, grpo.error
