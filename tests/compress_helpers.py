"""Tiny transformers models and data for the compression tests (``tests/test_compress*.py``)."""

from __future__ import annotations

import torch

VOCAB = 64


def data(m: int, n: int, N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and anisotropic, correlated inputs X [n, N] (float64)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    X = mix @ (scales[:, None] * torch.randn(n, N, generator=g, dtype=torch.float64))
    return W, X


def gpt2(layers: int = 2, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=layers,
        n_embd=32,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return GPT2LMHeadModel(cfg).eval()


def llama(
    layers: int = 2, tie: bool = False, dtype=None, vocab: int = VOCAB, d: int = 32, mlp: int = 48
):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=d,
        intermediate_size=mlp,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    if dtype is not None:
        cfg.dtype = dtype
    return LlamaForCausalLM(cfg).to(dtype or torch.float32).eval()


def qwen2(layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        num_hidden_layers=layers,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).eval()


def qwen3(layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        num_hidden_layers=layers,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return Qwen3ForCausalLM(cfg).eval()


BUILDERS = {"gpt2": gpt2, "llama": llama, "qwen2": qwen2}


def batches(n: int = 3, b: int = 4, t: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(n)]


def perturb(model, scale: float = 0.5) -> None:
    """Scale the first block's MLP output so that later inputs differ between paths."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".0." in name and ("down_proj" in name or "mlp.c_proj" in name):
                p.mul_(scale)
