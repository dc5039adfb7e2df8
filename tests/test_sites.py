"""Hook-site resolution on tiny GPT-2, Qwen3-style and BERT models built from configs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from saekit.sources.sites import StopForward, find_blocks, hook_site, parse_site, resolve_site

N_LAYERS = 3


def tiny(kind: str) -> nn.Module:
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=N_LAYERS, n_embd=32, n_head=2, vocab_size=200, n_positions=64)
        model: nn.Module = GPT2LMHeadModel(cfg)
    elif kind == "qwen3":
        cfg = Qwen3Config(
            num_hidden_layers=N_LAYERS,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=200,
            max_position_embeddings=64,
        )
        model = Qwen3ForCausalLM(cfg)
    else:
        cfg = BertConfig(
            num_hidden_layers=N_LAYERS,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            vocab_size=200,
            max_position_embeddings=64,
        )
        model = BertModel(cfg)
    return model.eval()


KINDS = ["gpt2", "qwen3", "bert"]


def capture(model: nn.Module, names: list[str], ids: Tensor) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    sites = {n: resolve_site(model, n) for n in names}
    hooks = [
        hook_site(s, lambda h, n=n: out.__setitem__(n, h.detach().clone()))
        for n, s in sites.items()
    ]
    for h in hooks:
        h.__enter__()
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.__exit__(None, None, None)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_resid_sites_match_hidden_states(kind: str) -> None:
    model = tiny(kind)
    ids = torch.randint(5, 200, (2, 7))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    names = [f"layers.{i}.{k}" for i in range(N_LAYERS) for k in ("resid_pre", "resid_post")]
    got = capture(model, names, ids)
    for i in range(N_LAYERS):
        torch.testing.assert_close(got[f"layers.{i}.resid_pre"], hs[i], rtol=0, atol=0)
        # decoders apply the final norm to the last entry of hidden_states
        if i < N_LAYERS - 1 or kind == "bert":
            torch.testing.assert_close(got[f"layers.{i}.resid_post"], hs[i + 1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gpt2", "qwen3"])
def test_prenorm_block_is_sum_of_attn_and_mlp(kind: str) -> None:
    model = tiny(kind)
    ids = torch.randint(5, 200, (2, 6))
    names = [f"layers.1.{k}" for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
    got = capture(model, names, ids)
    recon = got["layers.1.resid_pre"] + got["layers.1.attn_out"] + got["layers.1.mlp_out"]
    torch.testing.assert_close(recon, got["layers.1.resid_post"], rtol=1e-5, atol=1e-5)
    assert got["layers.1.mlp_out"].abs().sum() > 0 and got["layers.1.attn_out"].abs().sum() > 0


def test_submodule_resolution() -> None:
    gpt2, qwen, bert = tiny("gpt2"), tiny("qwen3"), tiny("bert")
    assert resolve_site(gpt2, "layers.2.mlp_out").module is gpt2.transformer.h[2].mlp
    assert resolve_site(gpt2, "layers.0.attn_out").module is gpt2.transformer.h[0].attn
    assert resolve_site(qwen, "layers.1.mlp_out").module is qwen.model.layers[1].mlp
    assert resolve_site(qwen, "layers.1.attn_out").module is qwen.model.layers[1].self_attn
    lay = bert.encoder.layer[1]
    assert resolve_site(bert, "layers.1.mlp_out").module is lay.output.dense
    assert resolve_site(bert, "layers.1.attn_out").module is lay.attention.output.dense
    assert find_blocks(bert) is bert.encoder.layer
    site = resolve_site(bert, "layers.2.resid_pre")
    assert site.pre and site.module is bert.encoder.layer[2]


def test_bert_mlp_out_plus_residual_is_block_output() -> None:
    bert = tiny("bert")
    ids = torch.randint(5, 200, (2, 6))
    got = capture(bert, ["layers.1.mlp_out", "layers.1.resid_post"], ids)
    lay = bert.encoder.layer[1]
    # BertOutput: LayerNorm(dense(x) + attention_output); recompute from mlp_out
    inter = {}
    h = lay.attention.register_forward_hook(
        lambda m, a, o: inter.__setitem__("a", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        bert(input_ids=ids)
    h.remove()
    expect = lay.output.LayerNorm(got["layers.1.mlp_out"] + inter["a"])
    torch.testing.assert_close(expect, got["layers.1.resid_post"], rtol=1e-5, atol=1e-5)


def test_replacement_and_stop_forward() -> None:
    model = tiny("gpt2")
    ids = torch.randint(5, 200, (1, 5))
    site = resolve_site(model, "layers.0.resid_post")
    with hook_site(site, lambda h: torch.zeros_like(h)):
        got = capture(model, ["layers.1.resid_pre"], ids)
    assert got["layers.1.resid_pre"].abs().sum() == 0
    calls = []
    last = model.transformer.h[2].register_forward_hook(lambda *a: calls.append(1))

    def stop(h: Tensor) -> None:
        raise StopForward

    with hook_site(site, stop), pytest.raises(StopForward), torch.no_grad():
        model(input_ids=ids)
    last.remove()
    assert calls == []


@pytest.mark.parametrize(
    "name", ["layer.1.resid_post", "layers.x.resid_post", "layers.1.resid", "layers.1"]
)
def test_bad_site_names(name: str) -> None:
    with pytest.raises(ValueError, match="bad hook site"):
        parse_site(name)


def test_out_of_range_layer() -> None:
    with pytest.raises(ValueError, match="3 layers"):
        resolve_site(tiny("bert"), "layers.3.resid_post")
