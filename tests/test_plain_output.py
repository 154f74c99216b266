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
    hooks = plain_hooks(load_config(packaged_config("tiny")))
    with caplog.at_level(logging.INFO, logger="fedlora"):
        hooks.round_start(3, [0, 2])
        hooks.client_start(2, 5)
        hooks.step(1.0)
        hooks.round_end({"round": 3, "eval": {"global": {"loss": 1.23456}}})
    assert caplog.messages == ["round 3: client 2 (r=1), 5 steps", "round 3 done · global loss 1.2346"]
