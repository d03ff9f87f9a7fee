"""metav1.Condition helpers and minimal status patches (domain/conditions.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from metering_operator.domain.conditions import (
    condition_changed,
    format_time,
    get_condition,
    is_true,
    make_condition,
    set_condition,
    status_patch,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_new_condition_is_appended_with_transition_time() -> None:
    conds = set_condition([], "Ready", "True", "Configured", "ok", 3, T0)
    assert conds == [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Configured",
            "message": "ok",
            "observedGeneration": 3,
            "lastTransitionTime": "2026-01-02T03:04:05Z",
        }
    ]


def test_same_status_keeps_transition_time_but_updates_reason() -> None:
    first = set_condition([], "Entitled", "Unknown", "RegistrationPending", "0/3", 1, T0)
    second = set_condition(first, "Entitled", "Unknown", "RegistrationFailing", "throttled", 2, T1)
    assert second[0]["lastTransitionTime"] == format_time(T0)
    assert second[0]["reason"] == "RegistrationFailing"
    assert second[0]["observedGeneration"] == 2


def test_status_change_moves_transition_time_and_keeps_others() -> None:
    conds = set_condition([], "Ready", "True", "Configured", "ok", 1, T0)
    conds = set_condition(conds, "Entitled", "Unknown", "NoPods", "", 1, T0)
    conds = set_condition(conds, "Entitled", "True", "Registered", "3", 1, T1)
    assert [c["type"] for c in conds] == ["Ready", "Entitled"]
    entitled = get_condition(conds, "Entitled")
    assert entitled is not None
    assert entitled["lastTransitionTime"] == format_time(T1)
    assert is_true(conds, "Entitled")
    assert is_true(conds, "Ready")
    assert not is_true(conds, "Metering")


@pytest.mark.parametrize("reason", ["", "has space", "1Leading", "Trailing-dash"])
def test_invalid_reason_is_refused(reason: str) -> None:
    with pytest.raises(ValueError, match="reason"):
        make_condition("Ready", "True", reason, "", 1, T0)


def test_invalid_status_is_refused() -> None:
    with pytest.raises(ValueError, match="status"):
        make_condition("Ready", "Yes", "Ok", "", 1, T0)  # type: ignore[arg-type]


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        make_condition("Ready", "True", "Ok", "", 1, datetime(2026, 1, 1))


def test_condition_changed() -> None:
    a = make_condition("Ready", "True", "Ok", "m", 1, T0)
    assert not condition_changed(a, dict(a, lastTransitionTime="x", observedGeneration=9))
    assert condition_changed(a, dict(a, message="other"))
    assert condition_changed(None, a)
    assert not condition_changed(None, None)


def test_status_patch_is_none_when_unchanged() -> None:
    current = {"pods": {"registered": 3, "pending": 0}, "observedGeneration": 2, "metering": {"x": 1}}
    assert status_patch(current, {"pods": {"registered": 3, "pending": 0}, "observedGeneration": 2}) is None


def test_status_patch_contains_only_changes() -> None:
    current = {
        "pods": {"registered": 2, "pending": 1},
        "observedGeneration": 2,
        "conditions": [{"type": "A"}],
    }
    desired = {
        "pods": {"registered": 3, "pending": 1},
        "observedGeneration": 2,
        "conditions": [{"type": "A"}, {"type": "B"}],
        "registration": None,
    }
    assert status_patch(current, desired) == {
        "pods": {"registered": 3},
        "conditions": [{"type": "A"}, {"type": "B"}],
    }
    assert status_patch({"registration": {"state": "Granted"}}, {"registration": None}) == {
        "registration": None
    }
    assert status_patch(None, {"pods": {"registered": 1}}) == {"pods": {"registered": 1}}
