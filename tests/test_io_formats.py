"""Peer formats from hand-built files of each documented layout, and round trips through them.

Each reference encode below is written from the peer's documented equations, independent
of saekit; the files are laid out as the peer writes them. The same checks against files
written by the real peer packages are in test_io_peers.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from io_helpers import close, codes, trained
from saekit.errors import FormatError
from saekit.io import load_sae
from saekit.io.formats import detect_format, write_format
from saekit.io.native import open_sae
from saekit.io.portable import (
    Portable,
    fold_decoder_norm,
    gated_as_jumprelu,
    portable_from_sae,
    sae_from_portable,
    with_b_dec_input,
)

D, F, K = 12, 40, 5


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(64, D) * 2


# ---------------------------------------------------------------------- reading


def test_sparsify_dir(tmp_path: Path, x: torch.Tensor) -> None:
    w = {
        "encoder.weight": torch.randn(F, D),
        "encoder.bias": torch.randn(F) * 0.1,
        "W_dec": torch.randn(F, D),
        "b_dec": torch.randn(D),
    }
    d = tmp_path / "layers.3"
    d.mkdir()
    save_file(w, str(d / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True}
    cfg.update(num_latents=F, k=K, multi_topk=False, skip_connection=False, transcode=False)
    (d / "cfg.json").write_text(json.dumps({**cfg, "d_in": D}))
    (tmp_path / "config.json").write_text(json.dumps({"model": "gpt2", "ctx_len": 64}))
    assert detect_format(d) == "sparsify"
    sae, meta = open_sae(d)
    ref = topk_relu((x - w["b_dec"]) @ w["encoder.weight"].t() + w["encoder.bias"], K)
    close(codes(sae, x), ref)
    close(sae(x).x_hat, ref @ w["W_dec"] + w["b_dec"])
    assert meta["hook_name"] == "layers.3.resid_post" and meta["model_name"] == "gpt2"
    # a transcoder (no b_dec subtraction) without a skip connection
    (d / "cfg.json").write_text(json.dumps({**cfg, "transcode": True, "d_in": D}))
    ref = topk_relu(x @ w["encoder.weight"].t() + w["encoder.bias"], K)
    close(codes(load_sae(d), x), ref)
    sae = load_sae(d)
    assert sae.cfg.arch == ["transcoder"] and sae.arch["transcoder"].W_skip is None
    # a skip-transcoder (sparsify's W_skip [d_out, d_in]) at an MLP: layers.3.mlp_in -> mlp_out
    mlp = tmp_path / "layers.3.mlp"
    mlp.mkdir()
    skip = torch.randn(D, D) * 0.2
    save_file({**w, "W_skip": skip}, str(mlp / "sae.safetensors"))
    scfg = {**cfg, "transcode": True, "skip_connection": True, "d_in": D}
    (mlp / "cfg.json").write_text(json.dumps(scfg))
    sae, meta = open_sae(mlp)
    assert sae.cfg.arch == ["transcoder"] and sae.arch["transcoder"].opts.skip
    assert meta["hook_name"] == "layers.3.mlp_in" and meta["hook_name_out"] == "layers.3.mlp_out"
    close(codes(sae, x), ref)
    close(sae(x).x_hat, ref @ w["W_dec"] + w["b_dec"] + x @ skip.t())
    (d / "cfg.json").write_text(json.dumps({**cfg, "skip_connection": True, "d_in": D}))
    save_file({**w, "W_skip": skip}, str(d / "sae.safetensors"))
    with pytest.raises(FormatError, match="not a transcoder"):
        load_sae(d)


def _dl_ref(cls: str, sd: dict, x: torch.Tensor) -> torch.Tensor:
    """dictionary_learning's encode of each class, from its definition."""
    if cls == "AutoEncoder":
        return torch.relu((x - sd["bias"]) @ sd["encoder.weight"].t() + sd["encoder.bias"])
    if cls == "AutoEncoderTopK":
        pre = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].t() + sd["encoder.bias"])
        return topk_relu(pre, int(sd["k"]))
    if cls == "BatchTopKSAE":
        pre = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].t() + sd["encoder.bias"])
        return pre * (pre > sd["threshold"])
    if cls == "MatryoshkaBatchTopKSAE":
        pre = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        return pre * (pre > sd["threshold"])
    if cls == "JumpReluAutoEncoder":
        pre = x @ sd["W_enc"] + sd["b_enc"]
        return torch.relu(pre * (pre > sd["threshold"]))
    assert cls == "GatedAutoEncoder"
    x_enc = (x - sd["decoder_bias"]) @ sd["encoder.weight"].t()
    gate = (x_enc + sd["gate_bias"] > 0).float()
    return gate * torch.relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])


def _dl_state(cls: str) -> dict[str, torch.Tensor]:
    r = lambda *s: torch.randn(*s) * 0.5  # noqa: E731
    if cls == "AutoEncoder":
        return {
            "bias": r(D),
            "encoder.weight": r(F, D),
            "encoder.bias": r(F),
            "decoder.weight": r(D, F),
        }
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {
            "k": torch.tensor(K, dtype=torch.int),
            "threshold": torch.tensor(0.7),
            "decoder.weight": r(D, F),
            "encoder.weight": r(F, D),
            "encoder.bias": r(F),
            "b_dec": r(D),
        }
    if cls == "MatryoshkaBatchTopKSAE":
        return {
            "k": torch.tensor(K, dtype=torch.int),
            "threshold": torch.tensor(0.7),
            "group_sizes": torch.tensor([10, 30]),
            "W_enc": r(D, F),
            "b_enc": r(F),
            "W_dec": r(F, D),
            "b_dec": r(D),
        }
    if cls == "JumpReluAutoEncoder":
        th = torch.rand(F)
        return {"W_enc": r(D, F), "b_enc": r(F), "W_dec": r(F, D), "b_dec": r(D), "threshold": th}
    return {
        "decoder_bias": r(D),
        "encoder.weight": r(F, D),
        "r_mag": r(F),
        "gate_bias": r(F),
        "mag_bias": r(F),
        "decoder.weight": r(D, F),
    }


DL_CLASSES = [
    "AutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "JumpReluAutoEncoder",
    "GatedAutoEncoder",
]


@pytest.mark.parametrize("cls", DL_CLASSES)
def test_dictionary_learning_ae_pt(tmp_path: Path, x: torch.Tensor, cls: str) -> None:
    sd = _dl_state(cls)
    torch.save(sd, tmp_path / "ae.pt")
    trainer = {"dict_class": cls, "layer": 4, "lm_name": "EleutherAI/pythia-70m-deduped"}
    (tmp_path / "config.json").write_text(
        json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}})
    )
    sae, meta = open_sae(tmp_path / "ae.pt")
    ref = _dl_ref(cls, sd, x)
    close(codes(sae, x), ref)
    dec = sd.get("decoder.weight")
    W_dec = dec.t() if dec is not None else sd["W_dec"]
    b_dec = sd.get("b_dec", sd.get("bias", sd.get("decoder_bias")))
    close(sae(x).x_hat, ref @ W_dec + b_dec)
    assert meta["hook_name"] == "layers.4.resid_post"
    assert meta["dictionary_learning_class"] == cls
    arch = {"GatedAutoEncoder": ["gated"], "MatryoshkaBatchTopKSAE": ["matryoshka"]}
    assert sae.cfg.arch == arch.get(cls, [])


def test_dictionary_learning_without_config(tmp_path: Path, x: torch.Tensor) -> None:
    sd = _dl_state("JumpReluAutoEncoder")
    torch.save(sd, tmp_path / "ae.pt")
    close(codes(load_sae(tmp_path), x), _dl_ref("JumpReluAutoEncoder", sd, x))
    torch.save(_dl_state("AutoEncoderTopK"), tmp_path / "ae.pt")
    with pytest.raises(FormatError, match="AutoEncoderTopK or BatchTopKSAE"):
        load_sae(tmp_path)


class _Evil:
    pass


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(2, 2), "x": _Evil()}, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_sae(tmp_path)
    torch.save({"encoder_linear.weight": torch.zeros(2, 2), "x": _Evil()}, tmp_path / "s.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_sae(tmp_path / "s.pth")


def _jumprelu_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "W_enc": rng.normal(size=(D, F)).astype(np.float32),
        "W_dec": rng.normal(size=(F, D)).astype(np.float32),
        "b_enc": (rng.normal(size=F) * 0.1).astype(np.float32),
        "b_dec": rng.normal(size=D).astype(np.float32),
        "threshold": rng.uniform(0, 1.5, size=F).astype(np.float32),
    }


def _jumprelu_ref(a: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    pre = x @ torch.from_numpy(a["W_enc"]) + torch.from_numpy(a["b_enc"])
    return torch.relu(pre) * (pre > torch.from_numpy(a["threshold"]))


def test_gemma_scope_npz_and_safetensors(tmp_path: Path, x: torch.Tensor) -> None:
    a = _jumprelu_arrays()
    d = tmp_path / "models--google--gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "l0_82"
    d.mkdir(parents=True)
    np.savez(d / "params.npz", **a)
    sae, meta = open_sae(d)
    ref = _jumprelu_ref(a, x)
    close(codes(sae, x), ref)
    close(sae(x).x_hat, ref @ torch.from_numpy(a["W_dec"]) + torch.from_numpy(a["b_dec"]))
    assert meta["model_name"] == "google/gemma-2-2b"
    assert meta["hook_name"] == "layers.12.resid_post"
    d2 = tmp_path / "resid_post" / "layer_3_width_16k_l0_small"
    d2.mkdir(parents=True)
    st = {k.replace("W_", "w_"): torch.from_numpy(v) for k, v in a.items()}
    save_file(st, str(d2 / "params.safetensors"))
    sae2, meta2 = open_sae(d2)
    close(codes(sae2, x), ref)
    assert meta2["hook_name"] == "layers.3.resid_post"
    # a Gemma Scope 2 skip-transcoder: mlp_in -> mlp_out, affine_skip_connection [d_in, d_out]
    d3 = tmp_path / "transcoder_all" / "layer_3_width_16k_l0_small_affine"
    d3.mkdir(parents=True)
    A = torch.randn(D, D) * 0.2
    save_file({**st, "affine_skip_connection": A}, str(d3 / "params.safetensors"))
    sae3, meta3 = open_sae(d3)
    assert sae3.cfg.arch == ["transcoder"] and sae3.arch["transcoder"].opts.skip
    assert meta3["hook_name"] == "layers.3.mlp_in" and meta3["hook_name_out"] == "layers.3.mlp_out"
    close(codes(sae3, x), ref)
    W_dec, b_dec = torch.from_numpy(a["W_dec"]), torch.from_numpy(a["b_dec"])
    close(sae3(x).x_hat, ref @ W_dec + b_dec + x @ A)
    save_file({**st, "w_dec": st["w_dec"][:, None].repeat(1, 2, 1)}, str(d3 / "params.safetensors"))
    with pytest.raises(FormatError, match="cross-layer transcoder"):
        load_sae(d3)


def test_llama_scope_dir(tmp_path: Path, x: torch.Tensor) -> None:
    w = {
        "encoder.weight": torch.randn(F, D),
        "encoder.bias": torch.randn(F) * 0.1,
        "decoder.weight": torch.randn(D, F),
        "decoder.bias": torch.randn(D),
    }
    d = tmp_path / "Llama3_1-8B-Base-L7R-8x"
    (d / "checkpoints").mkdir(parents=True)
    save_file(w, str(d / "checkpoints" / "final.safetensors"))
    norm_in, jt = 3.0, 0.3
    hp = {"d_model": D, "d_sae": F, "hook_point_in": "blocks.7.hook_resid_post"}
    hp.update(hook_point_out="blocks.7.hook_resid_post", act_fn="jumprelu")
    hp.update(jump_relu_threshold=jt, norm_activation="dataset-wise", top_k=50)
    hp["dataset_average_activation_norm"] = {"in": norm_in, "out": norm_in}
    (d / "hyperparams.json").write_text(json.dumps(hp))
    sae, meta = open_sae(d)
    s = math.sqrt(D) / norm_in  # the input scale of training, folded (SAELens's conversion)
    pre = (x * s) @ w["encoder.weight"].t() + w["encoder.bias"]
    ref = torch.relu(pre) * (pre > jt * s)
    close(codes(sae, x), ref)
    close(sae(x).x_hat, (ref @ w["decoder.weight"].t() + w["decoder.bias"]) / s)
    assert meta["hook_name"] == "layers.7.resid_post"


def test_goodfire_pth(tmp_path: Path, x: torch.Tensor) -> None:
    w = {
        "encoder_linear.weight": torch.randn(F, D),
        "encoder_linear.bias": torch.randn(F) * 0.1,
        "decoder_linear.weight": torch.randn(D, F),
        "decoder_linear.bias": torch.randn(D),
    }
    path = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch.save(w, path)
    sae, meta = open_sae(path)
    ref = torch.relu(x @ w["encoder_linear.weight"].t() + w["encoder_linear.bias"])
    close(codes(sae, x), ref)
    close(sae(x).x_hat, ref @ w["decoder_linear.weight"].t() + w["decoder_linear.bias"])
    assert meta["format"] == "goodfire"
    assert meta["model_name"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert meta["hook_name"] == "layers.19.resid_post"


def test_deepseek_r1_pt(tmp_path: Path, x: torch.Tensor) -> None:
    w = {"encoder.weight": torch.randn(F, D), "encoder.bias": torch.randn(F) * 0.1}
    w.update({"decoder.weight": torch.randn(D, F), "decoder.bias": torch.randn(D)})
    path = tmp_path / "DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt"
    torch.save(w, path)
    sae, meta = open_sae(path)
    ref = torch.relu(x @ w["encoder.weight"].t() + w["encoder.bias"])  # SAELens deepseek_r1
    close(codes(sae, x), ref)
    close(sae(x).x_hat, ref @ w["decoder.weight"].t() + w["decoder.bias"])
    assert meta["model_name"] == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    assert meta["hook_name"] == "layers.19.resid_post"


def test_llama_scope_r1_distill(tmp_path: Path, x: torch.Tensor) -> None:
    from saekit.io.formats import read_foreign

    w = {"encoder.weight": torch.randn(F, D), "encoder.bias": torch.randn(F) * 0.1}
    w.update({"decoder.weight": torch.randn(D, F), "decoder.bias": torch.randn(D)})
    w["log_jumprelu_threshold"] = torch.randn(F) * 0.3
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"d_model": D, "expansion_factor": 4, "hook_point_in": "blocks.7.hook_resid_post"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert detect_format(tmp_path) == "llamascope_r1"
    with pytest.raises(FormatError, match="norm_scaling_factor.*saelens:llama_scope_r1_distill"):
        load_sae(tmp_path)
    s = 2.5  # the registry's norm_scaling_factor, folded as SAELens does
    sae, meta = read_foreign(tmp_path, hints={"norm_scaling_factor": s})
    pre = x @ (w["encoder.weight"].t() * s) + w["encoder.bias"]
    ref = torch.relu(pre) * (pre > w["log_jumprelu_threshold"].exp())
    close(codes(sae, x), ref)
    close(sae(x).x_hat, ref @ (w["decoder.weight"].t() / s) + w["decoder.bias"] / s)
    assert meta["hook_name"] == "layers.7.resid_post"


def test_saelens_topk_with_rescale_acts_by_decoder_norm(tmp_path: Path, x: torch.Tensor) -> None:
    """SAELens's default TopK cfg (rescale true) loads; codes follow SAELens's encode."""
    W_enc, b_enc = torch.randn(D, F), torch.randn(F) * 0.1
    W_dec, b_dec = torch.randn(F, D) * 3, torch.randn(D)  # rows not unit norm: a real rescale
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              str(tmp_path / "sae_weights.safetensors"))  # fmt: skip
    cfg = {"architecture": "topk", "d_in": D, "d_sae": F, "k": K, "dtype": "float32"}
    cfg.update(apply_b_dec_to_input=True, normalize_activations="none")
    cfg["rescale_acts_by_decoder_norm"] = True
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    norm = W_dec.norm(dim=1)
    pre = ((x - b_dec) @ W_enc + b_enc) * norm  # SAELens TopKSAE.encode with rescale
    ref = topk_relu(pre, K)
    close(codes(sae, x), ref)
    close(sae(x).x_hat, (ref / norm) @ W_dec + b_dec)


def test_saelens_gated_and_abstopk(tmp_path: Path, x: torch.Tensor) -> None:
    W, r, bg, bm = torch.randn(D, F), torch.randn(F) * 0.3, torch.randn(F), torch.randn(F)
    W_dec, b_dec = torch.randn(F, D), torch.randn(D)
    w = {"W_enc": W, "r_mag": r, "b_gate": bg, "b_mag": bm, "W_dec": W_dec, "b_dec": b_dec}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "gated", "d_in": D, "d_sae": F, "apply_b_dec_to_input": True}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    xin = x - b_dec
    ref = ((xin @ W + bg) > 0).float() * torch.relu(xin @ (W * r.exp()) + bm)  # GatedSAE.encode
    close(codes(sae, x), ref)
    assert sae.cfg.rule == "relu" and sae.cfg.arch == ["gated"]  # a saekit Gated SAE
    assert torch.equal(sae.b_enc, bg) and torch.equal(sae.arch["gated"].r_mag, r)
    close(sae(x).x_hat, ref @ W_dec + b_dec)
    w = {"W_enc": W, "b_enc": bm, "W_dec": W_dec, "b_dec": b_dec}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg.update(architecture="abstopk", k=K)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    pre = xin @ W + bm
    idx = pre.abs().topk(K, dim=-1).indices
    close(codes(sae, x), torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx)))


def test_unknown_layout_is_named(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match=r"no known SAE format \(found files \['weights.bin'\]"):
        load_sae(tmp_path)


# ---------------------------------------------------------------------- transforms


def _portable(arch: str = "jumprelu") -> Portable:
    th = torch.rand(F) if arch == "jumprelu" else None
    return Portable(arch, torch.randn(D, F), torch.randn(F), torch.randn(F, D) * 2,
                    torch.randn(D), th, k=K if arch == "topk" else None)  # fmt: skip


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "standard"])
def test_moving_b_dec_out_of_the_encoder_is_exact(x: torch.Tensor, arch: str) -> None:
    p = _portable(arch)
    a = sae_from_portable(p)
    b = sae_from_portable(with_b_dec_input(p, False))
    assert not b.cfg.apply_b_dec_to_input
    close(codes(a, x), codes(b, x))
    c = sae_from_portable(with_b_dec_input(with_b_dec_input(p, False), True))
    close(codes(a, x), codes(c, x))


def test_fold_decoder_norm_and_gated(x: torch.Tensor) -> None:
    p = fold_decoder_norm(_portable("topk"))
    torch.testing.assert_close(p.W_dec.norm(dim=1), torch.ones(F))
    gated = _portable("standard").replace(
        architecture="gated", extra={"r_mag": torch.randn(F), "b_gate": torch.randn(F),
                                     "b_mag": torch.randn(F)})  # fmt: skip
    moved = with_b_dec_input(gated, False)  # gate and magnitude biases both shift
    a, b = sae_from_portable(gated_as_jumprelu(gated)), sae_from_portable(gated_as_jumprelu(moved))
    close(codes(a, x), codes(b, x))


# ---------------------------------------------------------------------- writing


ROUND_TRIPS = [
    ("saelens", "topk", {}),
    ("saelens", "jumprelu", {"normalize_input": True}),
    ("sparsify", "topk", {}),
    ("sparsify", "topk", {"apply_b_dec_to_input": False, "normalize_input": True}),
    ("dictionary_learning", "relu", {}),
    ("dictionary_learning", "topk", {"normalize_input": True}),
    ("dictionary_learning", "jumprelu", {}),
    ("dictionary_learning", "batchtopk", {}),
    ("gemmascope", "jumprelu", {}),
    ("gemmascope", "relu", {"apply_b_dec_to_input": False}),
    ("llamascope", "batchtopk", {}),
    ("goodfire", "relu", {}),
    ("qwenscope", "topk", {}),
    # architecture parts (saekit.arch): kept where the format holds them, else exactly converted
    ("saelens", "relu", {"arch": ["gated"]}),
    ("saelens", "jumprelu", {"arch": ["gated"]}),
    ("dictionary_learning", "relu", {"arch": ["gated"], "normalize_input": True}),
    ("gemmascope", "relu", {"arch": ["gated"]}),
    ("saelens", "batchtopk", {"arch": ["matryoshka"], "arch_options": {"widths": [10, 40]}}),
    ("dictionary_learning", "batchtopk", {"arch": ["matryoshka"]}),
]
HOLDS = {"saelens": ("gated", "matryoshka"), "dictionary_learning": ("gated",)}


@pytest.mark.parametrize(("fmt", "rule", "kw"), ROUND_TRIPS, ids=lambda v: str(v))
def test_round_trip_through_every_writer(
    tmp_path: Path, x: torch.Tensor, fmt: str, rule: str, kw: dict
) -> None:
    sae = trained(rule, D, F, K, **kw)
    meta = {"hook_name": "layers.2.resid_post", "model_name": "org/model"}
    out = write_format(sae, tmp_path / "out", fmt, meta)
    back, got = open_sae(out)
    assert got["format"] in (fmt, "torch", "goodfire", "qwenscope")
    close(codes(back, x), codes(sae, x))
    close(back(x).x_hat, sae(x).x_hat)
    if fmt != "qwenscope":
        assert got.get("hook_name") in (None, "layers.2.resid_post")
    kept = [a for a in sae.cfg.arch if a in HOLDS.get(fmt, ())]
    assert back.cfg.arch == kept
    if "matryoshka" in kept:
        assert back.arch["matryoshka"].widths == sae.arch["matryoshka"].widths


def test_writers_refuse_what_they_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="sparsify format holds topk"):
        write_format(trained("relu", D, F, K), tmp_path / "a", "sparsify")
    with pytest.raises(FormatError, match="one jump_relu_threshold"):
        write_format(trained("jumprelu", D, F, K), tmp_path / "b", "llamascope")
    with pytest.raises(FormatError, match="unknown SAE format 'nope'"):
        write_format(trained("topk", D, F, K), tmp_path / "c", "nope")


def test_portable_from_sae_is_what_saelens_loads() -> None:
    sae = trained("topk", D, F, K, normalize_input=True)
    p = portable_from_sae(sae)
    assert p.architecture == "topk" and p.k == K
    w = sae.folded_weights()
    assert torch.equal(p.W_enc, w["W_enc"]) and torch.equal(p.b_dec, w["b_dec"])


def _prefix_ref(codes_: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, m: int):
    return codes_[:, :m] @ W_dec[:m] + b_dec


def test_matryoshka_files_read_as_matryoshka_saes(tmp_path: Path, x: torch.Tensor) -> None:
    from saekit.arch.matryoshka import prefix_reconstructions

    # dictionary_learning: widths are the cumulative group_sizes
    sd = _dl_state("MatryoshkaBatchTopKSAE")
    torch.save(sd, tmp_path / "ae.pt")
    sae = load_sae(tmp_path / "ae.pt")
    assert sae.cfg.rule == "batchtopk" and sae.cfg.arch == ["matryoshka"]
    assert sae.arch["matryoshka"].widths == [10, 40]
    ref = _dl_ref("MatryoshkaBatchTopKSAE", sd, x)
    with torch.no_grad():
        out = sae(x)
        base = torch.zeros_like(out.x_hat_n) + sae.b_dec
        (pred,) = prefix_reconstructions(sae, out.codes, [10], base)
    close(out.codes.to_dense(), ref)
    close(sae._to_raw_units(pred, x), _prefix_ref(ref, sd["W_dec"], sd["b_dec"], 10))
    # SAELens: an inference save (jumprelu; widths in its metadata) and a training
    # checkpoint (matryoshka_batchtopk, topk_threshold, rescale_acts_by_decoder_norm)
    w = {"W_enc": torch.randn(D, F), "b_enc": torch.randn(F) * 0.1}
    w.update(W_dec=torch.randn(F, D), b_dec=torch.randn(D))
    details = {"k": K, "matryoshka_widths": [8, F]}
    base_cfg = {"d_in": D, "d_sae": F, "apply_b_dec_to_input": True}
    meta = {"training_architecture": "matryoshka_batchtopk"}
    meta["training_architecture_details"] = details
    inf = tmp_path / "inf"
    inf.mkdir()
    save_file({**w, "threshold": torch.full((F,), 0.5)}, str(inf / "sae_weights.safetensors"))
    cfg = {**base_cfg, "architecture": "jumprelu", "metadata": meta}
    (inf / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(inf)
    assert sae.cfg.rule == "jumprelu" and sae.arch["matryoshka"].widths == [8, F]
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    close(codes(sae, x), torch.relu(pre) * (pre > 0.5))
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file({**w, "topk_threshold": torch.tensor(0.5)}, str(ck / "sae_weights.safetensors"))
    cfg = {**base_cfg, **details, "architecture": "matryoshka_batchtopk"}
    cfg["rescale_acts_by_decoder_norm"] = True
    (ck / "cfg.json").write_text(json.dumps({**cfg, "metadata": meta}))
    sae = load_sae(ck)
    assert sae.cfg.rule == "batchtopk" and sae.arch["matryoshka"].widths == [8, F]
    norm = w["W_dec"].norm(dim=1)
    scaled = torch.relu(pre * norm)  # SAELens compares the rescaled pre-activations
    close(codes(sae, x), scaled * (scaled > 0.5))
    with torch.no_grad():
        x_hat = sae(x).x_hat
    close(x_hat, (scaled * (scaled > 0.5) / norm) @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("rule", ["relu", "jumprelu"])
@pytest.mark.parametrize("skip", [False, True])
def test_saelens_transcoders_read_as_transcoders(
    tmp_path: Path, x: torch.Tensor, rule: str, skip: bool
) -> None:
    from saekit import SAE, SAEConfig

    opts = {"skip": skip, "target": "layers.2.mlp_out"}
    cfg = SAEConfig(d_in=D, d_out=7, d_sae=F, rule=rule, k=K, arch=["transcoder"],
                    arch_options=opts)  # fmt: skip
    sae = SAE(cfg).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    out = write_format(sae, tmp_path / "tc", "saelens", {"hook_name": "layers.2.mlp_in"})
    arch = json.loads((out / "cfg.json").read_text())["architecture"]
    assert arch == {"relu": "transcoder", "jumprelu": "jumprelu_transcoder"}[rule].replace(
        "transcoder", "skip_transcoder" if skip else "transcoder"
    )
    back = load_sae(out)
    assert back.cfg.arch == ["transcoder"] and back.arch["transcoder"].opts.skip == skip
    assert back.arch["transcoder"].opts.target == "layers.2.mlp_out" and back.d_out == 7
    close(codes(back, x), codes(sae, x))
    with torch.no_grad():
        close(back(x).x_hat, sae(x).x_hat)
