"""Every config error is one line naming the setting, the bad value and what is accepted."""

import pytest
import yaml

from fedlora.config import ConfigError, build_config, load_config, packaged_config
from fedlora.federation.experiment import check_model

TINY = packaged_config("tiny")


def _tiny_raw():
    return yaml.safe_load(TINY.read_text())


def test_packaged_configs_load_and_match_the_demo_description():
    default = load_config(None)
    assert default.federation.method == "flora" and default.federation.num_clients == 10
    assert default.client_ranks() == [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
    assert default.data.partition == "dirichlet" and default.data.alpha == 0.5
    tiny = load_config(TINY)
    assert tiny.client_ranks() == [4, 2, 1] and tiny.federation.num_clients == 3


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(TINY, ["federation.rounds=5", "train.lr=1e-3", "lora.ranks=[8,4,2]", "lora.target_modules=q_proj,k_proj", "output.dir=/tmp/x"])
    assert cfg.federation.rounds == 5 and cfg.train.lr == 1e-3
    assert cfg.client_ranks() == [8, 4, 2] and cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert load_config(TINY, ["lora.ranks=8,4,2"]).client_ranks() == [8, 4, 2]


def test_lora_rank_override_replaces_the_ranks_list():
    cfg = load_config(TINY, ["lora.rank=2"])
    assert cfg.lora.ranks is None and cfg.client_ranks() == [2, 2, 2]


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["federation.rouns=3"], r"^federation\.rouns: unknown setting \(accepted in federation: method, rounds"),
        (["colour=red"], r"^colour: unknown setting \(accepted in top level: seed, model, lora"),
        (["federation.rounds=many"], r"^federation\.rounds: .*integer.*, got 'many'$"),
        (["federation.rounds=0"], r"^federation\.rounds: .*greater than or equal to 1.*, got 0$"),
        (["lora.ranks=[4,2]"], r"^lora\.ranks: 2 ranks \[4, 2\] for federation\.num_clients=3 \(accepted: exactly 3 ranks, or lora\.rank=R\)$"),
        (["lora.ranks=[4,0,1]"], r"^lora\.ranks: must be positive integers, got \[4, 0, 1\]$"),
        (["data.partition=zipf"], r"^data\.partition: .*'iid', 'dirichlet', 'pathological', 'natural' or 'quantity', got 'zipf'$"),
        (["federation.fraction=1.5"], r"^federation\.fraction: .*less than or equal to 1.*, got 1\.5$"),
        (["lora.scale=[1.0, 2.0]"], r"^lora\.scale: 2 scales for federation\.num_clients=3"),
        (["train.micro_batch_size=16"], r"^train\.micro_batch_size: 16 > train\.batch_size=4$"),
        (["nonsense"], r"^override: 'nonsense' is not key=value"),
        (["lora.adapter=adalora", "federation.method=fedit", "lora.rank=2"], r"^lora\.adapter: 'adalora' works with federation\.method=flora only, got 'fedit'"),
        (["lora.adapter=dora"], r"^lora\.adapter: .*'lora' or 'adalora'.*, got 'dora'$"),
        (["lora.rank_patterns={v_proj: [1, 2]}"], r"^lora\.rank_patterns\.v_proj: \[1, 2\] \(accepted: one positive rank, or exactly 3 of them\)$"),
    ],
)
def test_bad_settings_fail_with_one_clear_line(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(TINY, overrides)
    assert "\n" not in str(e.value)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"^config: file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^config: .*bad\.yaml is not valid YAML"):
        load_config(bad)


def _real_model_cfg(overrides):
    return build_config(_tiny_raw(), overrides)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["lora.ranks=[4,2,600]"], r"^lora\.ranks: rank 600 exceeds layer model\.layers\.0\.self_attn\.q_proj \(576×576\) \(accepted: 1\.\.576\)$"),
        (["lora.ranks=[4,2,200]"], r"^lora\.ranks: rank 200 exceeds layer model\.layers\.0\.self_attn\.v_proj \(192×576\) \(accepted: 1\.\.192\)$"),
        (["lora.rank_patterns={v_proj: 300}"], r"^lora\.rank_patterns: rank 300 exceeds layer .*v_proj"),
        (["lora.rank_patterns={o_proj: 3}"], r"^lora\.rank_patterns\.o_proj: matches no target layer"),
        (["lora.target_modules=[qkv]"], r"^lora\.target_modules: no Linear layer named \['qkv'\]"),
        (["lora.target_modules=[q_proj,wq]"], r"^lora\.target_modules: \['wq'\] not found"),
        (["model.path=/no/such/model"], r"^model\.path: no HF model folder \(config\.json\) at /no/such/model"),
    ],
)
def test_checks_against_the_real_model_folder(overrides, pattern):
    """Uses only config.json of the embedded SmolLM2 (meta device): fast."""
    with pytest.raises(ConfigError, match=pattern):
        check_model(_real_model_cfg(overrides))


def test_missing_data_file_is_named(tmp_path):
    from fedlora.data import DataError
    from fedlora.federation.experiment import prepare

    with pytest.raises(DataError, match=r"^data\.source: file not found: /no/such\.jsonl"):
        prepare(_real_model_cfg(["data.source=/no/such.jsonl"]))
