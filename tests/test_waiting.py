"""What users read while they wait."""

from __future__ import annotations

import pytest

from webapp.waiting import StepClock, about, running_status, waiting_status


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "under a second"), (13.6, "about 14 s"), (89, "about 89 s"), (200, "about 3 min")]
)
def test_durations_read_like_people_say_them(seconds: float, text: str) -> None:
    assert about(seconds) == text


def test_waiting_shows_position_and_an_estimate_once_a_step_time_is_known() -> None:
    assert waiting_status(2, 28, None) == "waiting for the GPU: 2 ahead"
    assert waiting_status(2, 28, 0.5) == "waiting for the GPU: 2 ahead · about 14 s"
    assert waiting_status(0, None, 0.5) == "waiting for the GPU: 0 ahead"


def test_running_shows_the_step_and_time_left() -> None:
    assert running_status(3, 25, None) == "step 3/25"
    assert running_status(3, 25, 0.5) == "step 3/25 · about 11 s left"
    assert running_status(25, 25, 0.5) == "step 25/25"


def test_the_step_clock_follows_the_measured_steps() -> None:
    clock = StepClock()
    assert clock.seconds is None
    clock.observe(1.0)
    assert clock.seconds == 1.0
    for _ in range(30):
        clock.observe(0.2)
    assert clock.seconds == pytest.approx(0.2, abs=0.01)
