"""TransformerLens (HookedTransformer, TransformerBridge) and nnsight models as sources.

Run in the peers venv, which has transformer-lens and nnsight (saekit from ``src``); the
reference activations are each library's own: ``run_with_cache`` for a HookedTransformer,
the wrapped Hugging Face model's for a TransformerBridge and an nnsight LanguageModel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from peer_helpers import needs_peers, run_peers
from saekit.sources.backends import TransformerLensModel, adapt_model
from saekit.sources.sites import canonical_site, hook_site, resolve_site, transformer_lens_name

SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
import torch
from saekit.apply.toy import make_demo_lm
from saekit.config import DataConfig, SAEConfig, TrainConfig
from saekit.sources.hf import HFSource, load_model
from saekit.train import train
out = Path(sys.argv[1]); res = {}
make_demo_lm(str(out / "lm"))
hf, tok = load_model(str(out / "lm"), causal=True)
sites = ["layers.1.resid_post", "layers.0.mlp_out", "blocks.1.hook_resid_pre"]
cfg = DataConfig(sites=sites, context_len=16, shuffle_buffer=0, model_batch_size=4)
def diff(a, b):
    assert torch.equal(a.meta["token_ids"], b.meta["token_ids"])
    return max(float((a.acts[s] - b.acts[s]).abs().max()) for s in sites)

# nnsight: the LanguageModel's own HF model and tokenizer
from nnsight import LanguageModel
lm = LanguageModel(hf, tokenizer=tok)
res["nnsight"] = diff(HFSource(cfg, model=lm).next_batch(300),
                      HFSource(cfg, model=hf, tokenizer=tok).next_batch(300))

# TransformerBridge: its original_model with the bridge's tokenizer
from transformer_lens.model_bridge import TransformerBridge
bridge = TransformerBridge.boot_transformers(str(out / "lm"), hf_model=hf, tokenizer=tok)
res["bridge"] = diff(HFSource(cfg, model=bridge).next_batch(300),
                     HFSource(cfg, model=bridge.original_model, tokenizer=bridge.tokenizer)
                     .next_batch(300))

# HookedTransformer: exactly run_with_cache's activations at the kept tokens
from transformer_lens import HookedTransformer, HookedTransformerConfig
torch.manual_seed(0)
tl = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=32, d_head=4,
                                               d_vocab=len(tok), act_fn="gelu", d_mlp=32))
src = HFSource(cfg, model=tl, tokenizer=tok)
ids, mask = src._next_inputs()
src = HFSource(cfg, model=tl, tokenizer=tok)
b = src.next_batch(int(src._keep(ids, mask).sum()))
with torch.no_grad():
    _, cache = tl.run_with_cache(ids, attention_mask=mask)
keep = src._keep(ids, mask)
names = {"layers.1.resid_post": "blocks.1.hook_resid_post",
         "layers.0.mlp_out": "blocks.0.hook_mlp_out",
         "blocks.1.hook_resid_pre": "blocks.1.hook_resid_pre"}
res["hooked"] = max(float((b.acts[s] - cache[n][keep]).abs().max()) for s, n in names.items())
# and it trains an SAE end to end, with gradients through the frozen TL model
gcfg = DataConfig(sites=["layers.1.resid_post"], context_len=16, model_batch_size=4,
                  inputs=["grad"], shuffle_buffer=256)
gsrc = HFSource(gcfg, model=tl, tokenizer=tok)
r = train(SAEConfig(rule="gtopk", expansion=2, k=4), TrainConfig(out_dir=str(out / "run"),
          total_tokens=512, batch_size=128, progress=False), gsrc, gcfg)
res["trained_steps"] = r.steps
res["grad_norm"] = float(gsrc.next_batch(8).inputs["grad"]["layers.1.resid_post"].norm())
print(json.dumps(res))
"""


@needs_peers
def test_transformerlens_and_nnsight_models_as_sources(tmp_path: Path) -> None:
    res = json.loads(run_peers(SCRIPT, str(tmp_path)).strip().splitlines()[-1])
    assert res["nnsight"] < 1e-5, res
    assert res["bridge"] < 1e-5, res
    assert res["hooked"] == 0.0, res  # the hook points themselves
    assert res["trained_steps"] == 4 and res["grad_norm"] > 0


def test_transformerlens_hook_names_are_site_aliases() -> None:
    assert canonical_site("blocks.3.hook_resid_post") == "layers.3.resid_post"
    assert canonical_site("blocks.0.hook_mlp_out") == "layers.0.mlp_out"
    assert canonical_site("layers.2.attn_out") == "layers.2.attn_out"
    assert transformer_lens_name("layers.5.resid_pre") == "blocks.5.hook_resid_pre"
    with pytest.raises(ValueError, match="TransformerLens name"):
        transformer_lens_name("blocks.1.hook_z")


class _Hook(nn.Module):
    def forward(self, x):
        return x


class _FakeHooked(nn.Module):
    """The attributes saekit reads from a HookedTransformer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.hook = _Hook()
        self.unembed = nn.Linear(4, 7)
        self.embed = nn.Embedding(7, 4)
        self.tokenizer = "tok"
        self.cfg = type("C", (), {"n_layers": 1, "n_ctx": 8})()

    @property
    def hook_dict(self):
        return {"blocks.0.hook_resid_post": self.hook}

    def forward(self, ids, attention_mask=None):
        return self.unembed(self.hook(self.blocks[0](self.embed(ids))))


def test_hooked_transformer_adapter_resolves_hook_points() -> None:
    model, tok = adapt_model(_FakeHooked())
    assert isinstance(model, TransformerLensModel) and tok == "tok"
    assert model.config.max_position_embeddings == 8
    site = resolve_site(model, "layers.0.resid_post")
    assert site.module is model.tl.hook
    seen = []
    with hook_site(site, seen.append):
        logits = model(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2)).logits
    assert logits.shape == (1, 2, 7) and seen[0].shape == (1, 2, 4)
    plain = nn.Linear(2, 2)
    assert adapt_model(plain, "t") == (plain, "t")
