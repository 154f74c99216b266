"""Which cells a study runs, and how: --only, the command of a new and of a resumed cell, slots."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.config import ConfigError
from fedlora.study.runner import argv, selected, slots
from fedlora.study.spec import load_study

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"config: {ROOT / 'configs' / 'tiny.yaml'}\nseeds: 2\nfactors:\n  method: [flora, fedplora, fedit]\n")
    return load_study(path)


def test_only_picks_cells_by_glob_and_refuses_a_pattern_that_matches_none(study):
    assert [c.name for c in selected(study, "fedplora-seed[01], fedit-seed1")] == ["fedplora-seed0", "fedplora-seed1", "fedit-seed1"]
    assert len(selected(study, None)) == 6
    with pytest.raises(ConfigError, match=r"^--only: 'zeropad-\*' matches no cell of s \(accepted: globs over cell names, e.g. flora-seed0\)$"):
        selected(study, "zeropad-*")


def test_a_new_cell_is_a_fedlora_run_into_its_folder_and_a_started_one_resumes(study, tmp_path):
    cell = study.cells()[4]  # fedit-seed0: one rank for every client
    out = tmp_path / "out"
    new = argv(study, cell, out)
    assert new[-1] == f"output.dir={out / 'runs' / 'fedit-seed0'}" and "lora.rank=1" in new and "seed=0" in new
    assert new.index("output.save_final=false") < new.index("federation.method=fedit")  # the study's overrides may turn it on
    (out / "runs" / "fedit-seed0").mkdir(parents=True)
    (out / "runs" / "fedit-seed0" / ".lock").touch()  # killed before its config was written: started afresh
    assert argv(study, cell, out)[-1].startswith("output.dir=") and not (out / "runs" / "fedit-seed0").exists()
    (out / "runs" / "fedit-seed0").mkdir(parents=True)
    (out / "runs" / "fedit-seed0" / "config.yaml").write_text("seed: 0\n")
    assert argv(study, cell, out)[-2:] == ["--resume", str(out / "runs" / "fedit-seed0")]
    (out / "runs" / "fedit-seed0" / "metrics.jsonl").write_text('{"round": 0}\n')  # rounds, but their checkpoints did not travel
    assert argv(study, cell, out)[-1].startswith("output.dir=") and not (out / "runs" / "fedit-seed0").exists()


def test_jobs_share_the_cpus_and_threads_can_be_set():
    assert all(s.threads >= 1 for s in slots(2)) and len(slots(3)) == 3
    assert [s.threads for s in slots(2, threads=5)] == [5, 5]
