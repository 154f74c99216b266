"""fedlora export on a tiny random Llama folder: the adapter reproduces the run's global model
(exactly, or as W_0 + the best rank-r ΔW, off by the printed error), and the merged folder equals
base + adapter."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedlora.cli import main
from fedlora.evaluation.export_run import export_run
from fedlora.model.adapters import AdapterHost
from fedlora.model.export import Spectrum, smallest_rank, spectra
from fedlora.model.loading import target_layer_shapes
from fedlora.ops.lowrank import LowRank

from tests.conftest import rel_err
from tests.evaluation.tiny_run import TARGETS, tiny_model_dir, tiny_run_dir

IDS = torch.tensor([[2, 5, 9, 11, 7, 30, 14, 6]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("base") / "tiny-llama")


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def _global_logits(base, delta):
    """The run's global model W_0 + ΔW_g, as the simulator evaluates it."""
    model = _load(base)
    host = AdapterHost(model, list(target_layer_shapes(model, TARGETS)))
    host.set_delta(delta)
    return _logits(host.model)


def test_exact_method_adapter_gives_the_global_models_logits(base, tmp_path):
    run, delta = tiny_run_dir(tmp_path / "run", base, "fedit", [2, 2, 2])
    e = export_run(run, tmp_path / "out")
    assert e.kind == "adapter" and e.rank == e.exact_rank == 2 and e.max_layer_error == 0.0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama" and config["r"] == 2  # the portable name, not this machine's path
    got = _logits(PeftModel.from_pretrained(_load(base), tmp_path / "out"))
    assert rel_err(got, _global_logits(base, delta)) < 1e-6  # float32 weights and factors


def test_flora_is_compressed_within_the_printed_error(base, tmp_path, capsys):
    run, delta = tiny_run_dir(tmp_path / "run", base, "flora", [3, 2, 1])
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--rank", "4"]) == 0
    printed = capsys.readouterr().out
    e = json.loads((tmp_path / "out" / "fedlora_export.json").read_text())
    assert e["rank"] == 4 and e["exact_rank"] == 12 and f"{100 * e['max_layer_error']:.3f}%" in printed
    card = (tmp_path / "out" / "README.md").read_text()  # what trained it, and what the export cost
    assert "method `flora`" in card and "ranks [3, 2, 1]" in card and "rank 4 of 12" in card and f"{100 * e['max_layer_error']:.3f}%" in card
    peft_model = PeftModel.from_pretrained(_load(base), tmp_path / "out")
    layers = AdapterHost.lora_layers(peft_model)
    errors = {}
    for name, terms in delta.items():
        true = sum(t.dense() for t in terms)
        layer = layers[name]
        got = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double() * layer.scaling["default"]
        errors[name] = rel_err(got, true)
    assert max(errors.values()) == pytest.approx(e["max_layer_error"], rel=1e-4)
    assert 0.05 < e["max_layer_error"] < 1  # rank 4 of 12 really loses something
    truncated = {}  # the best rank-4 ΔW per layer, from a dense float64 SVD
    for name, terms in delta.items():
        U, S, Vh = torch.linalg.svd(sum(t.dense() for t in terms), full_matrices=False)
        truncated[name] = [LowRank(U[:, :4] * S[:4], Vh[:4])]
    assert rel_err(_logits(peft_model), _global_logits(base, truncated)) < 1e-5


def test_default_rank_is_the_smallest_within_one_percent(base, tmp_path):
    run, delta = tiny_run_dir(tmp_path / "run", base, "flora", [3, 2, 1])
    e = export_run(run, tmp_path / "out")
    specs = spectra(delta)
    assert e.max_layer_error <= 0.01 and e.rank <= e.exact_rank
    assert max(s.rel_error(e.rank - 1) for s in specs.values()) > 0.01


def test_rank_choice_on_a_hand_made_spectrum():
    s = Spectrum(U=torch.eye(4, dtype=torch.float64), S=torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float64), Vh=torch.eye(4, dtype=torch.float64))
    assert s.rel_error(1) == pytest.approx((1.01 / 101.01) ** 0.5, rel=1e-14)
    assert s.rel_error(2) == pytest.approx((0.01 / 101.01) ** 0.5, rel=1e-14)
    assert s.exact_rank() == 3
    assert smallest_rank({"L": s}, 0.05) == 2 and smallest_rank({"L": s}, 0.2) == 1 and smallest_rank({"L": s}, 0.0) == 3


def test_merged_folder_equals_base_plus_adapter(base, tmp_path):
    run, delta = tiny_run_dir(tmp_path / "run", base, "fedit", [2, 2, 2])
    export_run(run, tmp_path / "adapter")
    e = export_run(run, tmp_path / "merged", merged=True)
    assert e.kind == "merged" and (tmp_path / "merged" / "tokenizer.json").is_file()
    card = (tmp_path / "merged" / "README.md").read_text()  # every exported folder has its card
    assert "AutoModelForCausalLM.from_pretrained(\"<this folder>\")" in card and "PeftModel" not in card
    merged, original = _load(tmp_path / "merged").state_dict(), _load(base).state_dict()
    adapter = PeftModel.from_pretrained(_load(base), tmp_path / "adapter")
    layers = AdapterHost.lora_layers(adapter)
    for key, w0 in original.items():
        name = key.removesuffix(".weight")
        if name in layers:
            layer = layers[name]
            lora_B, lora_A = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
            expected = w0.double() + lora_B @ lora_A * layer.scaling["default"]
            assert rel_err(merged[key].double(), expected) < 1e-6 and not torch.equal(merged[key], w0)
        else:
            assert torch.equal(merged[key], w0), key
    assert rel_err(_logits(_load(tmp_path / "merged")), _logits(adapter)) < 1e-6


def test_user_errors_are_one_line(base, tmp_path, capsys):
    run, _ = tiny_run_dir(tmp_path / "run", base, "fedit", [2, 2])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (["--out", str(tmp_path / "a"), "--rank", "0"], "--rank: 0 (accepted: an integer >= 1)"),
        (["--out", str(tmp_path / "b"), "--rank", "9"], "--rank: 9 exceeds the update's exact rank 2 (accepted: 1..2"),
        (["--out", str(tmp_path / "full")], "already holds files"),
        (["--out", str(tmp_path / "c"), "--client", "0"], "--client: "),
    ]
    for extra, message in cases:
        assert main(["export", str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err.replace("\n", " ") and "Traceback" not in err


def test_personal_run_exports_one_client(base, tmp_path, capsys):
    run, delta0 = tiny_run_dir(tmp_path / "run", base, "local", [2, 1])
    assert main(["export", str(run), "--out", str(tmp_path / "none")]) == 2
    assert "--client: local runs have no global model, only per-client ones (accepted: --client one of [0, 1])" in capsys.readouterr().err.replace("\n", " ")
    e = export_run(run, tmp_path / "c0", client=0)
    assert e.rank == 2 and e.max_layer_error == 0.0
    got = _logits(PeftModel.from_pretrained(_load(base), tmp_path / "c0"))
    assert rel_err(got, _global_logits(base, delta0)) < 1e-6


def test_no_layer_of_an_adapter_is_wider_than_the_layer_and_a_larger_than_dense_one_says_so(base, tmp_path, caplog):
    from safetensors.torch import load_file

    from fedlora.model.export import load_adapter_delta, save_adapter

    model = _load(base)
    shapes = target_layer_shapes(model, TARGETS)
    host = AdapterHost(model, list(shapes))
    g = torch.Generator().manual_seed(3)
    delta = {n: [LowRank(torch.randn(o, 40, generator=g, dtype=torch.float64), torch.randn(40, i, generator=g, dtype=torch.float64))]
             for n, (o, i) in shapes.items()}  # a stack of rank 40 on layers 32 and 16 wide
    with caplog.at_level("WARNING"):
        r = save_adapter(host, delta, TARGETS, tmp_path / "a", str(base))
    assert r == 32 and "more than the dense update" in caplog.text and "--merged" in caplog.text
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for key, t in saved.items():
        layer = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        assert max(t.shape[0] if "lora_A" in key else t.shape[1], 0) <= min(shapes[layer]), (key, t.shape)
    back = load_adapter_delta(host, tmp_path / "a")
    for n, terms in delta.items():
        assert rel_err(back[n][0].dense(), terms[0].dense()) < 1e-5  # exact, in float32


@pytest.mark.parametrize("method, ranks", [("fedex", [2, 2, 2]), ("florist", [3, 2, 1]), ("zeropad", [3, 2, 1])])
def test_every_merging_method_is_compressed_by_default(base, tmp_path, monkeypatch, method, ranks):
    """A method that declares ``merges`` (its ΔW's rank grows with the rounds) exports at the smallest rank within the tolerance, as FLoRA does.

    Random updates have flat spectra: a 50 % tolerance makes the truncation visible.
    """
    from fedlora.evaluation import export_run as module
    from fedlora.methods import REGISTRY

    assert REGISTRY[method].merges
    monkeypatch.setattr(module, "TOLERANCE", 0.5)
    run, delta = tiny_run_dir(tmp_path / "run", base, method, ranks)
    e = export_run(run, tmp_path / "out")
    assert e.rank == smallest_rank(spectra(delta), 0.5) < e.exact_rank and 0 < e.max_layer_error <= 0.5


def test_a_method_that_does_not_merge_is_exported_exactly(base, tmp_path, monkeypatch):
    from fedlora.evaluation import export_run as module

    monkeypatch.setattr(module, "TOLERANCE", 0.5)
    run, _ = tiny_run_dir(tmp_path / "run", base, "flexlora", [3, 2, 1])
    e = export_run(run, tmp_path / "out")
    assert e.rank == e.exact_rank and e.max_layer_error == 0.0


def test_an_exported_adapter_names_its_base_portably_and_finds_it_by_the_hint_or_by_base(base, tmp_path):
    """adapter_config.json holds no absolute path (the base's portable name); eval finds the base through the path hint
    fedlora wrote beside it, and, where the folder travelled without it, through --base; without either, one line."""
    import shutil

    from fedlora.evaluation.models import load_for_eval
    from fedlora.evaluation.runs import RunFolderError
    from fedlora.model.loading import portable_base_name

    run, delta = tiny_run_dir(tmp_path / "run", base, "fedit", [2, 2, 2])
    export_run(run, tmp_path / "out")
    assert str(tmp_path) not in (tmp_path / "out" / "adapter_config.json").read_text()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: tiny-llama\n" in card and f"local copy `{base}`" in card
    want = _global_logits(base, delta)
    assert rel_err(_logits(load_for_eval(tmp_path / "out", device="cpu").model), want) < 1e-6  # the hint in fedlora_export.json

    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "out", moved)
    (moved / "fedlora_export.json").unlink()  # the adapter alone, on a machine where no hint holds
    with pytest.raises(RunFolderError) as err:
        load_for_eval(moved, device="cpu")
    assert "'tiny-llama' is no local model folder here" in str(err.value) and "--base" in str(err.value)
    assert rel_err(_logits(load_for_eval(moved, device="cpu", base=base).model), want) < 1e-6
    with pytest.raises(RunFolderError, match="--base: .* is no local model folder"):
        load_for_eval(moved, device="cpu", base=tmp_path / "nothing")

    (base / "config.json").write_text(json.dumps({**json.loads((base / "config.json").read_text()), "_name_or_path": "org/tiny-llama"}))
    try:
        assert portable_base_name(base) == "org/tiny-llama"  # a hub-style name the folder records is kept
    finally:
        (base / "config.json").write_text(json.dumps({k: v for k, v in json.loads((base / "config.json").read_text()).items()
                                                      if k != "_name_or_path"}))
