"""``bench speed --engine webui --vs builtin``: the parts that need no webui (the real run is in test_webui_real)."""

from __future__ import annotations

import os
import socket

import pytest

from lib_ti.bench import webui_speed
from lib_ti.bench.webui_speed import WebuiSpeedSettings
from lib_ti.errors import TIError
from lib_ti.remote import builtin


def test_the_builtins_200_answers_are_read_for_what_they_say():
    builtin.check_train_answer("train embedding complete: filename: /e/x.pt error: None")
    with pytest.raises(TIError, match="GroupedBatchSampler.*super\\(\\).__init__\\(\\).*status 200"):
        builtin.check_train_answer("train embedding complete: filename:  error: object.__init__() takes exactly "
                                   "one argument (the instance to initialize)")
    with pytest.raises(TIError, match=r"super\(\)\.__init__\(\)"):
        builtin.check_train_answer("train embedding complete: filename:  error: Sampler.__init__() takes exactly "
                                   "one argument (the instance to initialize)")
    with pytest.raises(TIError, match="failed \\(its API answered 200 with\\): 'train embedding error: boom'"):
        builtin.check_train_answer("train embedding error: boom")


def test_the_builtins_body_never_has_both_intervals_zero():
    body = builtin.train_body(name="n", data_dir="/d", log_dir="/l", steps=15, width=128, height=128)
    assert body["create_image_every"] == 0 and body["save_embedding_every"] == 15  # one save, at the end
    assert len(body) == 30  # every argument of the host's train_embedding, which its API requires


def test_ratios_are_per_pair_and_a_failed_run_is_reported_not_divided():
    runs = [{"pair": 1, "trainer": "ours", "s_per_step": 2.0}, {"pair": 1, "trainer": "builtin", "s_per_step": 6.0},
            {"pair": 2, "trainer": "ours", "s_per_step": 3.0}, {"pair": 2, "trainer": "builtin", "s_per_step": 6.0},
            {"pair": 3, "trainer": "ours", "s_per_step": 2.5}, {"pair": 3, "trainer": "builtin", "error": "boom"}]
    ratio = webui_speed.ratios(runs)
    assert ratio["pairs"] == [3.0, 2.0] and ratio["median"] == 2.5 and ratio["min"] == 2.0
    report = {"checkpoint": "c", "settings": vars(WebuiSpeedSettings(data_dir="/d")), "runs": runs, "ratios": ratio,
              "load": "1 1 1"}
    text = webui_speed.format_report(report)
    assert "| 3 | builtin | failed: boom |" in text and "median 2.50 [min 2.00, max 3.00] over 2 pair(s)" in text


def test_the_step_window_is_timed_from_the_polled_steps(monkeypatch):
    monkeypatch.setattr(webui_speed, "POLL_S", 0.001)
    steps = iter(range(0, 20))
    s = WebuiSpeedSettings(data_dir="/d", steps=4, warmup=2)

    def poll():
        step = next(steps)
        return step, step >= s.total_steps

    figures = webui_speed._timed(lambda: None, poll, s, os.getpid())
    assert figures["steps_seen"] == s.total_steps == 8 and figures["s_per_step"] >= 0.001
    assert figures["peak_rss_gib"] >= figures["baseline_rss_gib"] > 0  # this process's own /proc figures


def test_the_webuis_process_is_found_from_its_listening_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert webui_speed.webui_pid(f"http://127.0.0.1:{port}") == os.getpid()
    assert webui_speed.webui_pid("http://example.org:7860") == 0  # not this machine: no memory figures


def test_settings_are_checked_before_any_request():
    with pytest.raises(TIError, match="needs --data DIR"):
        WebuiSpeedSettings()
    with pytest.raises(TIError, match="--vs 'kohya' is unknown"):
        WebuiSpeedSettings(data_dir="/d", vs="kohya")
