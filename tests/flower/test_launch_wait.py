"""`fedlora deploy` waits for its run as long as the run takes: a real federation may train for days."""

from __future__ import annotations

import inspect

from fedlora.flower.launch import LocalFederation, RunHandle


def test_deploy_sets_no_deadline_on_its_run_by_default():
    # a 30-minute default once ended every longer deployment with "flwr run did not finish within 1800 s"
    assert inspect.signature(RunHandle.wait).parameters["timeout"].default is None
    assert inspect.signature(LocalFederation.run).parameters["timeout"].default is None
