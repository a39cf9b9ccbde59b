import math

import pytest

from lib_ti.errors import TIError
from lib_ti.schedule import parse_schedule

WEBUI_EXAMPLE = "0.05:10, 0.02:20, 0.01:60, 0.005:200, 0.002:500, 0.001:3000"


def test_piecewise_values_follow_webui_semantics():
    s = parse_schedule(WEBUI_EXAMPLE)
    # value i applies while fewer than end_i steps are done
    assert [s.value_at(n) for n in (0, 9, 10, 19, 20, 59, 60, 199, 200, 499, 500, 2999)] == [
        0.05, 0.05, 0.02, 0.02, 0.01, 0.01, 0.005, 0.005, 0.002, 0.002, 0.001, 0.001]
    assert s.end_step == 3000


@pytest.mark.parametrize("text", ["0.005", "0.05:10, 0.005", "0.05:10, 0.005:-1"])
def test_bare_rate_or_minus_one_runs_to_the_end(text):
    s = parse_schedule(text)
    assert math.isinf(s.end_step)
    assert s.planned_steps(100_000) == 100_000
    assert s.describe_end(100_000) is None
    assert s.value_at(10**9) == 0.005


def test_schedule_ending_before_max_steps_stops_there_and_says_so():
    s = parse_schedule("0.05:10, 0.005:200")
    assert s.planned_steps(1000) == 200
    assert s.planned_steps(150) == 150
    note = s.describe_end(1000)
    assert "200" in note and "1000" in note and ":-1" in note
    # used for a clip value, the last value persists
    assert s.value_at(5000) == 0.005


def test_value_is_a_pure_function_of_step_so_resume_mid_schedule_is_exact():
    a, b = parse_schedule(WEBUI_EXAMPLE), parse_schedule(WEBUI_EXAMPLE)
    assert [a.value_at(n) for n in range(0, 600)] == [b.value_at(n) for n in range(0, 600)]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0.05:abc", "'abc'"),
        ("0.05:10,,", "empty piece (piece 2)"),
        ("0.05:10, 0.005,", "empty piece (piece 3)"),
        ("abc", "'abc' in 'abc' is not a number"),
        ("-0.05:10", "positive"),
        ("0:10", "positive"),
        ("0.05:20, 0.01:10", "steps must increase"),
        ("0.05:10, 0.01:10", "steps must increase"),
        ("0.05:0", "must be positive"),
        ("0.05:-5", "must be positive"),
        ("0.05, 0.01:10", "must be the last piece"),
        ("0.05:-1, 0.01:10", "must be the last piece"),
        ("", "empty"),
        (" , ", "empty"),
        ("nan", "positive"),
    ],
)
def test_malformed_schedules_name_the_bad_piece(text, fragment):
    with pytest.raises(TIError) as info:
        parse_schedule(text)
    assert fragment in str(info.value)
    assert str(info.value).startswith("[TI Trainer]")


def test_clip_schedule_names_itself_in_errors():
    with pytest.raises(TIError, match="clip value schedule"):
        parse_schedule("x", what="clip value")
