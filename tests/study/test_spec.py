"""Study files: factors crossed with seeds, exclusions, one rank for the methods that need it, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.config import ConfigError
from fedlora.study.spec import load_study


ROOT = Path(__file__).resolve().parents[2]


def write(tmp: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def test_a_grid_of_three_factor_forms_times_seeds_less_the_excluded(tmp_path):
    study = load_study(write(tmp_path, f"""
config: {ROOT / 'configs' / 'tiny.yaml'}
overrides: [federation.rounds=4]
seeds: [3, 5]
factors:
  method: [flora, fedit]
  steps: {{key: train.local_steps, values: [1, 2]}}
  profile:
    hetero: {{lora.ranks: [4, 2, 1]}}
    homo: {{lora.rank: 2}}
exclude:
  - {{method: fedit, steps: 2}}
"""))
    cells = study.cells()
    assert len(cells) == (4 * 2 - 2) * 2  # (2 methods × 2 steps − the fedit/2-step pair) × 2 profiles × 2 seeds
    names = [c.name for c in cells]
    assert names[:4] == ["flora-steps1-hetero-seed3", "flora-steps1-hetero-seed5", "flora-steps1-homo-seed3", "flora-steps1-homo-seed5"]
    assert not any(n.startswith("fedit-steps2") for n in names)
    cfg = study.cell_config(next(c for c in cells if c.name == "fedit-steps1-hetero-seed5"))
    # fedit needs one rank: the smallest client rank; the study's overrides, the cell's and its seed apply
    assert (cfg.client_ranks(), cfg.federation.method, cfg.train.local_steps, cfg.seed, cfg.federation.rounds) == ([1, 1, 1], "fedit", 1, 5, 4)
    assert study.cell_config(next(c for c in cells if c.name == "flora-steps2-homo-seed3")).client_ranks() == [2, 2, 2]
    # every seed is scored on the same held-out examples: the first config's seed
    assert {study.cell_config(c).data.global_test_seed for c in cells} == {0}


def test_one_rank_and_packaged_configs(tmp_path):
    study = load_study(write(tmp_path, "config: tiny\nseeds: 1\none_rank: 2\nfactors:\n  method: [fedit, zeropad]\n"))
    ranks = {c.labels["method"]: study.cell_config(c).client_ranks() for c in study.cells()}
    assert ranks == {"fedit": [2, 2, 2], "zeropad": [4, 2, 1]}


def test_a_method_from_outside_that_declares_one_rank_runs_at_one_rank(tmp_path, outside):
    study = load_study(write(tmp_path, f"config: tiny\nseeds: 1\nfactors:\n  method: [zeropad, '{outside}:OneRank']\n"))
    ranks = {c.labels["method"]: study.cell_config(c).client_ranks() for c in study.cells()}
    assert ranks == {"zeropad": [4, 2, 1], f"{outside}_OneRank": [1, 1, 1]}


@pytest.mark.parametrize("text, says", [
    ("config: tiny\nfactors:\n  method: [flora, nosuch]\n", "cell nosuch-seed0: federation.method"),
    ("config: tiny\nfactors:\n  method: flora\n", "factors.method: invalid value 'flora'"),
    ("config: tiny\nseeds: 0\n", "seeds: invalid value 0"),
    ("config: tiny\nseeds: [1, 1]\n", "seeds: invalid value [1, 1]"),
    ("config: nosuch.yaml\n", "config: invalid value 'nosuch.yaml'"),
    ("config: tiny\nmetric: bleu\n", "metric: invalid value 'bleu' (accepted: loss, accuracy)"),
    ("config: tiny\nfactor: {}\n", "unknown key 'factor'"),
    ("config: tiny\nfactors:\n  method: [flora]\nexclude:\n  - {method: fedit}\n", "exclude.method: invalid value 'fedit' (accepted: flora)"),
    ("config: tiny\nfactors:\n  method: [flora]\nexclude:\n  - {method: flora}\n", "no cells"),
    ("config: tiny\nfactors:\n  train.lr: [0.1, 5]\n", "cell lr5: train.lr: input should be less than or equal to 1, got 5"),
    ("config: tiny\nreference: fedit\nfactors:\n  method: [flora]\n", "reference: invalid value 'fedit'"),
    ("- a list\n", "must hold a mapping"),
])
def test_bad_study_files_fail_in_one_line_naming_the_setting(tmp_path, text, says):
    with pytest.raises(ConfigError) as e:
        load_study(write(tmp_path, text))
    assert says in str(e.value) and "\n" not in str(e.value)
