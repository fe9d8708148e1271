"""DAPO's options: the soft overlong punishment and the informative-group test (pure functions);
their use in a training step is tested in test_tapo_step.py."""

import pytest

from tapo_ds.algorithms.dapo import informative, overlong_penalty


def test_overlong_penalty_is_dapo_eq_13():
    # L_max = 100, L_cache = 20: free up to 80 tokens, linear to -1 at 100, -1 beyond
    assert overlong_penalty(10, 100, 20) == 0.0
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(130, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(90, 100, 20, penalty=0.5) == pytest.approx(-0.25)
    assert overlong_penalty(100, 100, 0) == 0.0  # off
    with pytest.raises(ValueError, match="overlong window"):
        overlong_penalty(10, 100, 101)


def test_informative_groups():
    assert informative([0.0, 1.0, 0.0])
    assert not informative([1.0, 1.0])
    assert not informative([0.0])
    assert not informative([])
