"""Off a terminal (a log file, CI, a pipe) the command line writes plain, unwrapped lines and no bars."""

from __future__ import annotations

import logging

from fedlora import cli
from fedlora.app.progress import plain_hooks
from fedlora.config import load_config, packaged_config


def test_the_log_handler_off_a_terminal_writes_one_unwrapped_line_per_message():
    assert not cli.console.is_terminal  # pytest captures stderr
    handler = cli._log_handler()
    assert not isinstance(handler, cli.RichHandler)
    message = "kept 240 of 240 examples " + "x" * 200
    line = handler.format(logging.LogRecord("fedlora", logging.INFO, __file__, 1, message, None, None))
    assert "\n" not in line and line.endswith(message) and "progress.py" not in line


def test_plain_hooks_log_each_client_and_each_round(caplog):
    with caplog.at_level(logging.INFO, logger="fedlora"):
        hooks = plain_hooks(load_config(packaged_config("tiny")))
        hooks.round_start(3, [0, 2])
        hooks.client_start(2, 5)
        hooks.step(1.0)
        hooks.round_end({"round": 3, "eval": {"global": {"loss": 1.23456}}})
    assert caplog.messages == ["evaluating before round 1: the global test split and 3 clients' own (at most 12 examples each)",
                               "round 3: client 2 (r=1), 5 steps", "round 3 done · global loss 1.2346"]


def test_off_a_terminal_a_time_estimate_follows_the_first_round_and_a_heartbeat_breaks_a_silence(caplog):
    import time

    from fedlora.app.progress import Heartbeat, eta_line

    cfg = load_config(packaged_config("tiny"), ["federation.rounds=21"])
    with caplog.at_level(logging.INFO, logger="fedlora"):
        hooks = plain_hooks(cfg)
        caplog.clear()  # the line before round 1 (the test above checks it)
        hooks.round_end({"round": 1, "wall_s": 30.0, "eval": {"global": {"loss": 2.0}}})
        hooks.round_end({"round": 2, "wall_s": 90.0, "eval": {"global": {"loss": 1.9}}})
    assert "about 10 min left for rounds 2–21 (at 30.0 s a round so far)" in caplog.messages  # 20 rounds × 30 s
    assert not any("left" in m for m in caplog.messages[2:])  # not every round: the first, then every tenth
    assert eta_line({"round": 10}, [60.0] * 10, 21) == "about 11 min left for rounds 11–21 (at 60.0 s a round so far)"
    assert eta_line({"round": 21}, [60.0], 21) is None

    caplog.clear()
    beat = Heartbeat(every=0.2)
    try:
        with caplog.at_level(logging.INFO, logger="fedlora"):
            beat.now("training client 4 in round 7")
            time.sleep(0.5)
    finally:
        beat.stop.set()
    assert any(m.startswith("… still training client 4 in round 7") for m in caplog.messages)
