"""docs/config.md is the config model written out: every setting, and nothing the model does not accept."""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.cli import main
from fedlora.config import Config, load_config, packaged_config
from fedlora.config_reference import reference_markdown, rows

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_docs_config_md_is_what_the_model_writes_today():
    assert DOC.read_text() == reference_markdown(), "docs/config.md is stale: fedlora config --reference > docs/config.md"


def test_every_setting_is_listed_with_a_meaning_and_its_default_is_what_a_config_gets():
    listed = {key: default for key, _, default, _, meaning in rows() if meaning}
    assert len(listed) == len(rows())  # no setting without a meaning
    plain = Config.model_validate({"lora": {"rank": 2}}).model_dump(mode="json")
    for key in listed:
        node = plain
        for part in key.split("."):
            node = node[part]  # a listed key the model does not have fails here
        shown = listed[key].strip("`")
        if key not in ("lora.rank",):  # set above, so that the config validates
            assert (None if shown == "null" else shown if isinstance(node, str) else json.loads(shown)) == node, key
    assert {"train.precision", "data.global_test_seed", "federation.max_update_norm"} <= set(listed)


def test_fedlora_config_prints_the_resolved_config_that_loads_back(tmp_path, capsys):
    assert main(["config", str(packaged_config("tiny")), "federation.rounds=7"]) == 0
    (tmp_path / "c.yaml").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "c.yaml").federation.rounds == 7
