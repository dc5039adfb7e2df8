"""SASFT demo: fine-tune a tiny causal LM while penalising one SAE feature.

Everything is built offline in a few seconds on a CPU:

1. two toy "languages" (English-like words and a made-up language "xx"), plus
   code-switched English sentences with some xx words mixed in (the fine-tuning data);
2. a word-level tokenizer and a 2-layer GPT-2 built from a config, briefly pre-trained;
3. a TopK SAE trained on the residual stream after layer 1;
4. the target feature = the most xx-specific latent by monolinguality
   ν_j^xx = μ_j^xx − μ_j^en;
5. two fine-tuning runs from the same weights and batches: plain SFT and SFT + SASFT
   (λ · mean ReLU(pre_j − μ̄_j^en) over all tokens of the code-switched sentences).

It prints the target feature's mean pre-activation on held-out code-switched text before
fine-tuning and after each run. Run: ``python examples/sasft_finetune.py [--steps 40]``.
"""

from __future__ import annotations

import argparse
import copy
import random

import torch

from saekit import SAE, SAEConfig
from saekit.apply.ablate import mean_loss
from saekit.apply.common import pad_batch, site_activations
from saekit.apply.sasft import (
    SASFTRegularizer,
    group_mean_codes,
    mean_pre_activation,
    monolinguality,
)
from saekit.apply.toy import tiny_gpt2, train_tiny_lm, word_tokenizer

EN = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "in",
    "big",
    "small",
    "red",
    "house",
    "tree",
    "sees",
    "eats",
    "and",
    "with",
]
XX = ["ka", "lo", "mi", "tu", "sel", "vor", "nak", "pim", "ro", "zu", "dal", "fen"]
SITE = "layers.1.resid_post"


def sentences(words: list[str], n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 12))) for _ in range(n)]


def code_switched(n: int, rng: random.Random, p: float = 0.25) -> list[str]:
    out = []
    for s in sentences(EN, n, rng):
        out.append(" ".join(rng.choice(XX) if rng.random() < p else w for w in s.split()))
    return out


def train_sae(acts: torch.Tensor, steps: int, seed: int) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=acts.shape[1], d_sae=128, rule="topk", k=4, aux_k=16))
    sae.init_from_data(acts[:512])
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    sae.train()
    for _ in range(steps):
        x = acts[torch.randint(acts.shape[0], (128,), generator=g)]
        loss, _, _ = sae.loss(x)
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()
    return sae.eval()


def finetune(
    model: torch.nn.Module,
    tok: object,
    sae: SAE,
    texts: list[str],
    feature: int,
    ref: float,
    lam: float,
    steps: int,
    seed: int,
) -> torch.nn.Module:
    """Fine-tune a copy of ``model`` on ``texts``; ``lam > 0`` adds the SASFT term."""
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    ids = [tok(t)["input_ids"] for t in texts]  # type: ignore[operator]
    with SASFTRegularizer(model, sae, SITE, [feature], ref=ref, lam=lam) as reg:
        for _ in range(steps):
            pick = torch.randint(len(ids), (8,), generator=g).tolist()
            input_ids, mask = pad_batch([ids[i] for i in pick], torch.device("cpu"))
            labels = input_ids.masked_fill(mask == 0, -100)
            reg.token_mask = mask.bool()  # every real token is a "response" token here
            lm_loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss = lm_loss + reg.loss if lam > 0 else lm_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="fine-tuning steps per run")
    ap.add_argument("--lam", type=float, default=1.0, help="SASFT weight λ")
    ap.add_argument("--ref", choices=["en", "zero"], default="en", help="μ̄: English mean or 0")
    ap.add_argument("--pretrain-steps", type=int, default=60, help="LM pre-training steps")
    ap.add_argument("--sae-steps", type=int, default=300, help="SAE training steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    en, xx = sentences(EN, 120, rng), sentences(XX, 120, rng)
    sft_data, held_out = code_switched(120, rng), code_switched(30, rng)
    tok = word_tokenizer(en + xx, vocab_size=64)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=args.seed)
    train_tiny_lm(
        model, tok, en + xx, steps=args.pretrain_steps, context_len=32, batch_size=8, seed=args.seed
    )

    recs = site_activations(model, tok, SITE, en + xx)
    sae = train_sae(torch.cat([r.acts for r in recs]), steps=args.sae_steps, seed=args.seed)
    nu = monolinguality(group_mean_codes(sae, model, tok, SITE, {"en": en, "xx": xx}))["xx"]
    feature = int(nu.argmax())
    ref = 0.0
    if args.ref == "en":
        ref = float(mean_pre_activation(model, tok, sae, SITE, en, [feature])[0])

    def level(m: torch.nn.Module) -> float:
        return float(mean_pre_activation(m, tok, sae, SITE, held_out, [feature])[0])

    before = level(model)
    sft = finetune(model, tok, sae, sft_data, feature, ref, 0.0, args.steps, args.seed)
    sasft = finetune(model, tok, sae, sft_data, feature, ref, args.lam, args.steps, args.seed)
    res = {
        "feature": feature,
        "monolinguality": float(nu[feature]),
        "ref": ref,
        "before": before,
        "after_sft": level(sft),
        "after_sasft": level(sasft),
        "lm_loss_before": mean_loss(model, tok, held_out),
        "lm_loss_sft": mean_loss(sft, tok, held_out),
        "lm_loss_sasft": mean_loss(sasft, tok, held_out),
    }
    if not args.quiet:
        print(f"target feature {feature} (ν_xx = {res['monolinguality']:.3f}, μ̄ = {ref:.3f})")
        print("mean pre-activation on held-out code-switched text:")
        print(f"  before fine-tuning : {before:8.4f}")
        print(f"  after plain SFT    : {res['after_sft']:8.4f}")
        print(f"  after SFT + SASFT  : {res['after_sasft']:8.4f}   (λ = {args.lam})")
        print("held-out next-token loss (code-switched text):")
        print(f"  before {res['lm_loss_before']:.3f}  plain SFT {res['lm_loss_sft']:.3f}", end="")
        print(f"  SFT + SASFT {res['lm_loss_sasft']:.3f}")
    return res


if __name__ == "__main__":
    main()
