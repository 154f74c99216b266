"""Tiny random causal LMs saved as local HF folders with a small BPE tokenizer: a real `fedlora run` in seconds.

``save_tiny_model(folder)`` is the Llama of most tests (no chat template: the Alpaca prompt);
``save_tiny_model(folder, family)`` saves one of ``FAMILIES`` (Llama, Qwen2, Qwen3, Mistral,
Gemma 2, Gemma 3 text-only, Phi-3), each with a small chat template in its family's style. All
are float32, 2 layers, hidden 32, 4 query heads of 8 over 2 key/value heads.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

UNK, PAD, EOS = 0, 1, 2  # ids of <unk>, <pad>, <eos>
MARKERS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|end|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]  # chat-turn markers: one token each, after the BPE's 384


def _chat(user: str, user_end: str, assistant: str, assistant_end: str) -> str:
    """A jinja chat template: each turn as header + content + end; a generation prompt opens the assistant's turn."""
    return (
        "{% for m in messages %}{% if m['role'] == 'user' %}" + user + "{{ m['content'] }}" + user_end
        + "{% else %}" + assistant + "{{ m['content'] }}" + assistant_end + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


CHATML = _chat("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>\n")
TEMPLATES = {  # each family's turn markers, simplified (no system turn, no tools)
    "llama": _chat("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "qwen2": CHATML,
    "qwen3": CHATML,
    "mistral": _chat("[INST] ", " [/INST]", "", "<eos>"),
    "gemma2": _chat("<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n", "<end_of_turn>\n"),
    "gemma3": _chat("<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n", "<end_of_turn>\n"),
    "phi3": _chat("<|user|>\n", "<|end|>\n", "<|assistant|>\n", "<|end|>\n"),
}
FAMILIES = tuple(TEMPLATES)
FUSED = {"phi3"}  # one qkv_proj and one gate_up_proj per layer instead of q/k/v and gate/up
TIED = {"qwen2", "qwen3", "gemma2", "gemma3"}  # lm_head shares the input embedding's weight


@lru_cache(maxsize=1)
def _bpe_json() -> str:
    """A byte-level BPE of 384 tokens trained on the chatterbot pairs, as JSON: trained once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fedlora.data import load_examples

    texts = [t for e in load_examples("chatterbot") for t in (e.prompt, e.response)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<pad>", "<eos>"], show_progress=False))
    return bpe.to_str()


def tokenizer_for(family: str | None = None):
    """The BPE as a fast tokenizer; with the turn markers and the family's chat template when ``family`` is given."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json()), unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    if family is not None:
        tokenizer.add_tokens(MARKERS, special_tokens=True)
        tokenizer.chat_template = TEMPLATES[family]
    return tokenizer


HEAD = {"head_dim": 8}
CLASSES = {  # family → (config class, model class, what the family needs beyond the common settings)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),  # biased q/k/v
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**HEAD, "tie_word_embeddings": True}),  # q/k norms
    "mistral": ("MistralConfig", "MistralForCausalLM", {**HEAD, "sliding_window": 64}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**HEAD, "query_pre_attn_scalar": 8, "sliding_window": 64}),  # soft-capped logits
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**HEAD, "query_pre_attn_scalar": 8, "sliding_window": 64}),  # text-only
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv_proj, gate_up_proj
}


def missing_class(family: str) -> str | None:
    """The family's class this transformers lacks, or None."""
    import transformers as tf

    return next((f"transformers {tf.__version__} has no {c}" for c in CLASSES[family][:2] if not hasattr(tf, c)), None)


def family_model(family: str, vocab_size: int) -> torch.nn.Module:
    """A random-weight model of ``family`` (seeded)."""
    import transformers as tf

    config_name, model_name, extra = CLASSES[family]
    config = getattr(tf, config_name)(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS,
                                      **extra)
    torch.manual_seed(0)
    return getattr(tf, model_name)(config)


def save_tiny_model(folder: Path, family: str | None = None) -> Path:
    """config.json + model.safetensors + tokenizer files in ``folder`` (float32, 2 layers, hidden 32); Llama unless ``family``."""
    tokenizer = tokenizer_for(family)
    family_model(family or "llama", len(tokenizer)).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
