"""Held-out loss and perplexity on a data file, and greedy generations: what `fedlora eval` prints.

The file is read and tokenized as a run reads its data (any format `data.source` accepts, the
model's chat template, answer tokens only), so the loss is the one metrics.jsonl reports:
mean next-token cross-entropy per answer token in nats; perplexity = exp(loss).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from fedlora.data import DataError, load_examples, tokenize_examples
from fedlora.data.formatting import PLAIN_PREFIX
from fedlora.train.tasks import CausalLM


def heldout_metrics(
    model: torch.nn.Module, tokenizer: Any, path: Path, device: torch.device, max_length: int, batch_size: int = 8,
    train_on_inputs: bool = False,
) -> tuple[dict[str, float | int], list[str]]:
    """loss, perplexity, examples, answer tokens; and the file's prompts (for generations)."""
    examples = load_examples(str(path))
    tokenized = tokenize_examples(examples, tokenizer, max_length, train_on_inputs=train_on_inputs)
    if not tokenized:
        raise DataError(f"--data: {path} has no example with an answer token within {max_length} tokens (accepted: shorter prompts, or a larger --max-length)")
    task = CausalLM()
    loss = task.evaluate(model, tokenized, batch_size, tokenizer.pad_token_id, device)["loss"]
    tokens = sum(task.targets(t) for t in tokenized)
    metrics = {"loss": loss, "perplexity": math.exp(loss), "examples": len(tokenized), "answer_tokens": tokens}
    return metrics, [e.prompt for e in examples if e.prompt]


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The user turn as the model was tuned on it: its chat template, else the Alpaca header."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return PLAIN_PREFIX.format(prompt=prompt)


@torch.no_grad()
def greedy(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], device: torch.device, max_new_tokens: int = 48) -> list[str]:
    """Greedy continuations, one prompt at a time (no padding to reason about), special tokens dropped."""
    out = []
    for prompt in prompts:
        text = prompt_text(tokenizer, prompt)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids.to(device)
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
        )
        out.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out
