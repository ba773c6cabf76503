"""Small real models for tests: transformers' own GPT-2 from a tiny config (its embedding and output
head are tied), built the same way by every test that needs one."""

from __future__ import annotations

from typing import Any

import pytest


def gpt2(seed: int) -> Any:
    """A 2-layer GPT-2 with 32-wide embeddings over 96 tokens, its weights drawn from ``seed``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)
