"""Shared fixtures: seeded float64 factors, a tiny random Llama for logic tests, offline env, the example methods installed."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from fedlora.methods.base import ClientUpdate, Factors

from tests.example_methods import install as install_example_methods
from tests.methods.outside import outside  # noqa: F401 (fixture: a researcher's method module on sys.path)

EXAMPLE_SITE = install_example_methods()  # methods from an installed outside package, in every test that lists the registry


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests: on tiny shapes extra threads only wait on each other (badly so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def random_update(client: int, layers: dict[str, tuple[int, int]], rank: int, scale: float, n: int, gen: torch.Generator) -> ClientUpdate:
    """A client's trained factors with nonzero B, in float64."""
    factors = {
        name: Factors(B=torch.randn(d_out, rank, generator=gen, dtype=torch.float64), A=torch.randn(rank, d_in, generator=gen, dtype=torch.float64))
        for name, (d_out, d_in) in layers.items()
    }
    return ClientUpdate(client=client, num_examples=n, scale=scale, factors=factors)


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - y) / max(float(torch.linalg.norm(y)), 1e-300))


@pytest.fixture
def tiny_llama():
    """A 2-layer random Llama in float64: real transformers + PEFT code paths, milliseconds per call.

    A fresh one per test: a merging method leaves the model at its merged base after a run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    model.requires_grad_(False)
    return model
