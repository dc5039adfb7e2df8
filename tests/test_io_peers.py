"""Every peer format against the real peer packages (run in the peers venv, else skipped).

One peer script writes files with sae-lens, sparsify and dictionary_learning (the latter by
really training each of its trainers for a few steps with ``trainSAE``), runs SAELens's own
Gemma Scope and Llama Scope loaders on files in a fake hub cache, and records each peer's
encode of the same inputs; saekit's codes must equal them to 1e-5. A second script reads
the files saekit writes in each format with the peer and records its encode again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from io_helpers import close, codes, fake_hub_file, trained
from peer_helpers import needs_peers, run_peers
from saekit.io.formats import write_format
from saekit.io.native import open_sae

pytestmark = needs_peers
D, F, K = 16, 64, 5
QWEN = ("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_5", "layer3.sae.pt")  # L0_5: k = K
GEMMA2 = ("google/gemma-scope-2-4b-pt", "resid_post/layer_3_width_16k_l0_small")  # Gemma Scope 2
GOODFIRE = ("Goodfire/Llama-3.1-8B-Instruct-SAE-l19", "Llama-3.1-8B-Instruct-SAE-l19.pth")

# SAELens's Gemma Scope 2 loader reads tensor shapes by an HTTP range request: read the file
LOCAL_SHAPES = """
import sae_lens.loading.pretrained_sae_loaders as L
from huggingface_hub import hf_hub_download
def local_shapes(repo, filename):
    return {k: list(v.shape) for k, v in load_file(hf_hub_download(repo, filename)).items()}
L.get_safetensors_tensor_shapes = local_shapes
"""

WRITE_PEER_FILES = r"""
import json, math, sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import numpy as np, torch
from safetensors.torch import load_file, save_file
out = Path(sys.argv[1]); D, F, K = 16, 64, 5
torch.manual_seed(0)
x = load_file(str(out / "x.safetensors"))["x"]
def dense(vals, idx):
    return torch.zeros(x.shape[0], F).scatter(-1, idx, vals)
def perturb(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
expected = {}

# ---- dictionary_learning: real trainers, real trainSAE files
from dictionary_learning.training import trainSAE
from dictionary_learning.trainers.standard import StandardTrainer
from dictionary_learning.trainers.top_k import TopKTrainer
from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
from dictionary_learning.trainers.jumprelu import JumpReluTrainer
from dictionary_learning.trainers.gdm import GatedSAETrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers.top_k import AutoEncoderTopK
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
common = dict(activation_dim=D, dict_size=F, layer=2, lm_name="org/model", device="cpu",
              steps=40, warmup_steps=2)
topk = dict(k=K, threshold_start_step=5, auxk_alpha=1/32)
configs = [
    dict(trainer=StandardTrainer, sparsity_warmup_steps=2, **common),
    dict(trainer=TopKTrainer, **topk, **common),
    dict(trainer=BatchTopKTrainer, **topk, **common),
    dict(trainer=JumpReluTrainer, sparsity_warmup_steps=2, **common),
    dict(trainer=GatedSAETrainer, sparsity_warmup_steps=2, **common),
    dict(trainer=MatryoshkaBatchTopKTrainer, group_fractions=[0.25, 0.75], **topk, **common),
]
data = (torch.randn(256, D) * 2 + 0.5 for _ in range(1000))
trainSAE(data, configs, steps=40, save_dir=str(out / "dl"), normalize_activations=True,
         device="cpu")
classes = [AutoEncoder, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, GatedAutoEncoder,
           MatryoshkaBatchTopKSAE]
for i, cls in enumerate(classes):
    path = out / "dl" / f"trainer_{i}" / "ae.pt"
    if cls is AutoEncoder:  # from_pretrained would renormalise the decoder (rescaling codes)
        sd = torch.load(path); ae = AutoEncoder(D, F); ae.load_state_dict(sd)
    else:
        ae = cls.from_pretrained(str(path))
    with torch.no_grad():
        expected[f"dl/trainer_{i}"] = ae.encode(x)

# ---- sparsify: SparseCoder.save_to_disk
from sparsify import SparseCoder, SparseCoderConfig
for name, transcode in (("layers.2", False), ("layers.2.mlp", True)):
    sc = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K, transcode=transcode))
    perturb(sc)
    sc.save_to_disk(out / "sparsify" / name)
    with torch.no_grad():
        enc = sc.encode(x)
    expected[f"sparsify/{name}"] = dense(enc.top_acts, enc.top_indices)
sc = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K, transcode=True, skip_connection=True))
perturb(sc)  # a skip-transcoder: W_skip moved off its zero init
sc.save_to_disk(out / "sparsify_skip" / "layers.2.mlp")
with torch.no_grad():
    enc = sc.encode(x)
    expected["sparsify_skip/codes"] = dense(enc.top_acts, enc.top_indices)
    expected["sparsify_skip/x_hat"] = sc(x).sae_out

# ---- SAELens transcoders (d_out != d_in), saved and loaded as SAELens does
from sae_lens import SAE
from sae_lens.saes import (Transcoder, TranscoderConfig, SkipTranscoder, SkipTranscoderConfig,
    JumpReLUTranscoder, JumpReLUTranscoderConfig, JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig)
for name, (cls, ccls) in {"transcoder": (Transcoder, TranscoderConfig),
        "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
        "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
        "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)}.items():
    tc = cls(ccls(d_in=D, d_sae=F, d_out=D - 3, apply_b_dec_to_input=False))
    perturb(tc)
    with torch.no_grad():
        if hasattr(tc, "threshold"):
            tc.threshold.copy_(torch.rand(F) * 0.5)
    tc.save_model(str(out / "saelens_tc" / name))
    ref = SAE.load_from_disk(str(out / "saelens_tc" / name))
    with torch.no_grad():
        expected[f"saelens_tc/{name}"] = ref.encode(x)
        expected[f"saelens_tc/{name}/x_hat"] = ref(x)

# ---- SAELens: inference and training SAEs, saved as SAELens saves them
from sae_lens import SAE
from sae_lens.saes import (StandardSAE, StandardSAEConfig, JumpReLUSAE, JumpReLUSAEConfig,
    GatedSAE, GatedSAEConfig, TopKSAE, TopKSAEConfig, AbsTopKSAE, AbsTopKSAEConfig,
    TopKTrainingSAE, TopKTrainingSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig)
saes = {
    "standard": (StandardSAE(StandardSAEConfig(d_in=D, d_sae=F)), "save_model"),
    "jumprelu": (JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F)), "save_model"),
    "gated": (GatedSAE(GatedSAEConfig(d_in=D, d_sae=F)), "save_model"),
    "abstopk": (AbsTopKSAE(AbsTopKSAEConfig(d_in=D, d_sae=F, k=K)), "save_model"),
    "topk_rescale": (TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=K,
                                           rescale_acts_by_decoder_norm=True)), "save_model"),
    "topk_training": (TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K)),
                      "save_inference_model"),
    "topk_checkpoint": (TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K)),
                        "save_model"),
    "batchtopk_training": (BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=K)),
                           "save_inference_model"),
    "matryoshka_training": (MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D, d_sae=F, k=K, matryoshka_widths=[16, 64])), "save_inference_model"),
    "matryoshka_checkpoint": (MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D, d_sae=F, k=K, matryoshka_widths=[16, 64])), "save_model"),
}
for name, (sae, save) in saes.items():
    perturb(sae)
    with torch.no_grad():
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(F) * 0.5)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold = torch.tensor(0.4)
        sae.W_dec.mul_(torch.rand(F, 1) * 2 + 0.5)  # decoder rows far from unit norm
    getattr(sae, save)(str(out / "saelens" / name))
    if save == "save_model" and name.endswith("checkpoint"):
        ref = sae  # a training checkpoint: SAELens resumes it as the training SAE
    else:
        ref = SAE.load_from_disk(str(out / "saelens" / name))
    with torch.no_grad():
        expected[f"saelens/{name}"] = ref.encode(x)

# ---- Gemma Scope and Llama Scope through SAELens's own loaders (fake hub cache)
from sae_lens.loading.pretrained_sae_loaders import (gemma_2_sae_huggingface_loader,
    llama_scope_sae_huggingface_loader)
def jumprelu_codes(cfg, state, fold=None):
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=state["W_enc"].shape[0],
        d_sae=state["W_enc"].shape[1], apply_b_dec_to_input=cfg["apply_b_dec_to_input"]))
    sae.load_state_dict({k: v.float() for k, v in state.items()})
    if fold:
        sae.fold_activation_norm_scaling_factor(fold)
    with torch.no_grad():
        return sae.encode(x)
hub = json.loads((out / "hub.json").read_text())
for tag, (repo, folder) in hub["gemmascope"].items():
    cfg, state, _ = gemma_2_sae_huggingface_loader(repo, folder)
    expected[f"gemmascope/{tag}"] = jumprelu_codes(cfg, state)
for tag, (repo, folder, s) in hub["llamascope"].items():
    cfg, state, _ = llama_scope_sae_huggingface_loader(repo, folder,
                                                       cfg_overrides={"dtype": "float32"})
    expected[f"llamascope/{tag}"] = jumprelu_codes(cfg, state, fold=s)
from sae_lens.loading.pretrained_sae_loaders import get_goodfire_huggingface_loader
from sae_lens.saes import StandardSAE, StandardSAEConfig
def goodfire_codes(repo, folder):
    cfg, state, _ = get_goodfire_huggingface_loader(repo, folder,
        cfg_overrides={"d_in": D, "d_sae": F})
    sae = StandardSAE(StandardSAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"],
                                        apply_b_dec_to_input=cfg["apply_b_dec_to_input"]))
    sae.load_state_dict(state)
    with torch.no_grad():
        return sae.encode(x)
for tag, (repo, folder) in hub["goodfire"].items():
    expected[f"goodfire/{tag}"] = goodfire_codes(repo, folder)
from sae_lens.loading.pretrained_sae_loaders import qwen_scope_sae_huggingface_loader
from sae_lens.saes import TopKSAE, TopKSAEConfig
def qwen_codes(repo, folder, d_in, d_sae):
    cfg, state, _ = qwen_scope_sae_huggingface_loader(repo, folder,
        cfg_overrides={"d_in": d_in, "d_sae": d_sae})
    sae = TopKSAE(TopKSAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"],
        k=cfg["activation_fn_kwargs"]["k"], apply_b_dec_to_input=cfg["apply_b_dec_to_input"]))
    sae.load_state_dict(state)
    with torch.no_grad():
        return sae.encode(x)
for tag, (repo, folder) in hub["qwenscope"].items():
    expected[f"qwenscope/{tag}"] = qwen_codes(repo, folder, D, F)
# <local shapes>
for tag, (repo, folder) in hub["gemmascope2"].items():
    cfg, state, _ = L.gemma_3_sae_huggingface_loader(repo, folder)
    assert cfg["architecture"] == "jumprelu", cfg
    expected[f"gemmascope2/{tag}"] = jumprelu_codes(cfg, state)
save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))
"""

READ_SAEKIT_FILES = r"""
import json, sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import torch
from safetensors.torch import load_file, save_file
out = Path(sys.argv[1])
x = load_file(str(out / "x.safetensors"))["x"]
got = {}
from sparsify import SparseCoder
sc = SparseCoder.load_from_disk(out / "w" / "sparsify")
enc = sc.encode(x)
got["sparsify"] = torch.zeros(x.shape[0], sc.num_latents).scatter(-1, enc.top_indices, enc.top_acts)
from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers.top_k import AutoEncoderTopK
from dictionary_learning.dictionary import GatedAutoEncoder
for name, cls in (("relu", AutoEncoder), ("topk", AutoEncoderTopK),
                  ("jumprelu", JumpReluAutoEncoder), ("gated", GatedAutoEncoder)):
    path = out / "w" / f"dl_{name}" / "ae.pt"
    ae = (cls.from_pretrained(str(path), normalize_decoder=False) if cls is AutoEncoder
          else cls.from_pretrained(str(path)))
    got[f"dl_{name}"] = ae.encode(x)
from sae_lens import SAE
for name in ("topk", "jumprelu", "relu", "gated", "matryoshka"):
    got[f"saelens_{name}"] = SAE.load_from_disk(str(out / "w" / f"saelens_{name}")).encode(x)
from sae_lens.saes import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.loading.pretrained_sae_loaders import (gemma_2_sae_huggingface_loader,
    llama_scope_sae_huggingface_loader)
hub = json.loads((out / "w" / "hub.json").read_text())
for tag, (repo, folder, s) in hub.items():
    if tag == "gemmascope":
        cfg, state, _ = gemma_2_sae_huggingface_loader(repo, folder)
    else:
        cfg, state, _ = llama_scope_sae_huggingface_loader(repo, folder,
                                                           cfg_overrides={"dtype": "float32"})
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=state["W_enc"].shape[0],
                      d_sae=state["W_enc"].shape[1], apply_b_dec_to_input=False))
    sae.load_state_dict({k: v.float() for k, v in state.items()})
    if s:
        sae.fold_activation_norm_scaling_factor(s)
    got[tag] = sae.encode(x)
from sae_lens.loading.pretrained_sae_loaders import get_goodfire_huggingface_loader
from sae_lens.saes import StandardSAE, StandardSAEConfig
repo, folder, d_sae = json.loads((out / "w" / "goodfire.json").read_text())
cfg, state, _ = get_goodfire_huggingface_loader(repo, folder,
    cfg_overrides={"d_in": x.shape[1], "d_sae": d_sae})
sae = StandardSAE(StandardSAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"],
                                    apply_b_dec_to_input=cfg["apply_b_dec_to_input"]))
sae.load_state_dict(state)
got["goodfire"] = sae.encode(x)
# <local shapes>
repo, folder = json.loads((out / "w" / "gemma2.json").read_text())
cfg, state, _ = L.gemma_3_sae_huggingface_loader(repo, folder)
sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"],
                  apply_b_dec_to_input=cfg["apply_b_dec_to_input"]))
sae.load_state_dict(state)
got["gemmascope2"] = sae.encode(x)
from sae_lens.loading.pretrained_sae_loaders import qwen_scope_sae_huggingface_loader
from sae_lens.saes import TopKSAE, TopKSAEConfig
for tag, (repo, folder) in json.loads((out / "w" / "qwen.json").read_text()).items():
    cfg, state, _ = qwen_scope_sae_huggingface_loader(repo, folder,
        cfg_overrides={"d_in": x.shape[1], "d_sae": d_sae})
    sae = TopKSAE(TopKSAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"],
        k=cfg["activation_fn_kwargs"]["k"], apply_b_dec_to_input=cfg["apply_b_dec_to_input"]))
    sae.load_state_dict(state)
    got[tag] = sae.encode(x)
save_file({k: v.detach().contiguous() for k, v in got.items()}, str(out / "got.safetensors"))
"""

WRITE_PEER_FILES = WRITE_PEER_FILES.replace("# <local shapes>\n", LOCAL_SHAPES)
READ_SAEKIT_FILES = READ_SAEKIT_FILES.replace("# <local shapes>\n", LOCAL_SHAPES)


def _hub_files(hub: Path) -> dict:
    rng = np.random.default_rng(0)
    gemma_repo, gemma_folder = "google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_9"
    arrays = {
        "W_enc": rng.normal(size=(D, F)).astype(np.float32),
        "W_dec": rng.normal(size=(F, D)).astype(np.float32),
        "b_enc": (rng.normal(size=F) * 0.1).astype(np.float32),
        "b_dec": rng.normal(size=D).astype(np.float32),
        "threshold": rng.uniform(0, 1.5, size=F).astype(np.float32),
    }
    np.savez(fake_hub_file(hub, gemma_repo, f"{gemma_folder}/params.npz"), **arrays)
    llama_repo, llama_folder = "fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L3R-8x"
    w = {
        "encoder.weight": torch.randn(F, D),
        "encoder.bias": torch.randn(F) * 0.1,
        "decoder.weight": torch.randn(D, F),
        "decoder.bias": torch.randn(D),
    }
    save_file(
        w, str(fake_hub_file(hub, llama_repo, f"{llama_folder}/checkpoints/final.safetensors"))
    )
    norm_in = 2.5
    hp = {"d_model": D, "d_sae": F, "hook_point_in": "blocks.3.hook_resid_post", "top_k": 50}
    hp.update(hook_point_out="blocks.3.hook_resid_post", act_fn="jumprelu")
    hp.update(jump_relu_threshold=0.4, norm_activation="dataset-wise")
    hp["dataset_average_activation_norm"] = {"in": norm_in, "out": norm_in}
    fake_hub_file(hub, llama_repo, f"{llama_folder}/hyperparams.json").write_text(json.dumps(hp))
    s = math.sqrt(D) / norm_in  # the registry's norm_scaling_factor for this SAE
    # Goodfire: the one file of a repo SAELens's loader knows, its layout (nn.Linear weights)
    good_repo, good_file = GOODFIRE
    torch.save(
        {
            "encoder_linear.weight": torch.randn(F, D),
            "encoder_linear.bias": torch.randn(F) * 0.1,
            "decoder_linear.weight": torch.randn(D, F),
            "decoder_linear.bias": torch.randn(D),
        },
        fake_hub_file(hub, good_repo, good_file),
    )
    qw = {"W_enc": torch.randn(F, D), "b_enc": torch.randn(F) * 0.1}
    qw.update(W_dec=torch.randn(D, F), b_dec=torch.randn(D))
    torch.save(qw, fake_hub_file(hub, *QWEN))
    g2 = {k.lower(): torch.from_numpy(v) for k, v in arrays.items()}  # w_enc, w_dec, ...
    save_file(g2, str(fake_hub_file(hub, GEMMA2[0], f"{GEMMA2[1]}/params.safetensors")))
    g2cfg = {"architecture": "jump_relu", "model_name": "gemma-v3-4b-pt", "width": F}
    g2cfg.update(hf_hook_point_in="model.layers.3.output", affine_connection=False)
    fake_hub_file(hub, GEMMA2[0], f"{GEMMA2[1]}/config.json").write_text(json.dumps(g2cfg))
    return {
        "gemmascope2": {"res": list(GEMMA2)},
        "qwenscope": {"res": list(QWEN)},
        "goodfire": {"res": [good_repo, good_file]},
        "gemmascope": {"res": [gemma_repo, gemma_folder]},
        "llamascope": {"res": [llama_repo, llama_folder, s]},
    }


@pytest.fixture(scope="module")
def peer_files(tmp_path_factory) -> tuple[Path, torch.Tensor, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("peers")
    x = torch.randn(48, D) * 2 + 0.5
    save_file({"x": x}, str(out / "x.safetensors"))
    (out / "hub.json").write_text(json.dumps(_hub_files(out / "hub")))
    run_peers(WRITE_PEER_FILES, str(out), env={"HF_HUB_CACHE": str(out / "hub")})
    return out, x, load_file(str(out / "expected.safetensors"))


DL = ["relu", "topk", "batchtopk", "jumprelu", "relu", "batchtopk"]  # saekit rule per trainer


@pytest.mark.parametrize("i", range(6))
def test_dictionary_learning_trainer_files(peer_files, i: int) -> None:
    out, x, expected = peer_files
    sae, meta = open_sae(out / "dl" / f"trainer_{i}")
    assert sae.cfg.rule == DL[i], meta
    assert sae.cfg.arch == {4: ["gated"], 5: ["matryoshka"]}.get(i, [])
    assert meta["hook_name"] == "layers.2.resid_post" and meta["model_name"] == "org/model"
    close(codes(sae, x), expected[f"dl/trainer_{i}"], f"dictionary_learning trainer_{i}")
    if i == 5:  # MatryoshkaBatchTopKSAE: a saekit Matryoshka SAE of its group widths
        sizes = torch.load(out / "dl" / "trainer_5" / "ae.pt", weights_only=True)["group_sizes"]
        assert sae.cfg.arch == ["matryoshka"]
        assert sae.arch["matryoshka"].widths == sizes.cumsum(0).tolist()


def test_sparsify_skip_transcoder(peer_files) -> None:
    out, x, expected = peer_files
    sae, meta = open_sae(out / "sparsify_skip" / "layers.2.mlp")
    assert sae.cfg.arch == ["transcoder"] and sae.arch["transcoder"].opts.skip
    assert meta["hook_name"] == "layers.2.mlp_in" and meta["hook_name_out"] == "layers.2.mlp_out"
    close(codes(sae, x), expected["sparsify_skip/codes"], "sparsify skip-transcoder codes")
    with torch.no_grad():
        close(sae(x).x_hat, expected["sparsify_skip/x_hat"], "sparsify skip-transcoder output")


TRANSCODERS = ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]


@pytest.mark.parametrize("name", TRANSCODERS)
def test_saelens_transcoder_files(peer_files, name: str) -> None:
    out, x, expected = peer_files
    sae, _ = open_sae(out / "saelens_tc" / name)
    assert sae.cfg.arch == ["transcoder"] and sae.arch["transcoder"].opts.skip == ("skip" in name)
    assert sae.cfg.rule == ("jumprelu" if name.startswith("jumprelu") else "relu")
    close(codes(sae, x), expected[f"saelens_tc/{name}"], f"SAELens {name}")
    with torch.no_grad():
        close(sae(x).x_hat, expected[f"saelens_tc/{name}/x_hat"], f"SAELens {name} output")


@pytest.mark.parametrize("name", ["layers.2", "layers.2.mlp"])
def test_sparsify_files(peer_files, name: str) -> None:
    out, x, expected = peer_files
    sae, meta = open_sae(out / "sparsify" / name)
    close(codes(sae, x), expected[f"sparsify/{name}"], f"sparsify {name}")
    assert meta["transcoder"] == name.endswith("mlp")


SAELENS = [
    "standard",
    "jumprelu",
    "gated",
    "abstopk",
    "topk_rescale",
    "topk_training",
    "topk_checkpoint",
    "batchtopk_training",
    "matryoshka_training",
    "matryoshka_checkpoint",
]


@pytest.mark.parametrize("name", SAELENS)
def test_saelens_files(peer_files, name: str) -> None:
    out, x, expected = peer_files
    sae, _ = open_sae(out / "saelens" / name)
    if name == "gated":
        assert sae.cfg.rule == "relu" and sae.cfg.arch == ["gated"]
    if name.startswith("matryoshka"):
        assert sae.cfg.arch == ["matryoshka"] and sae.arch["matryoshka"].widths == [16, 64]
    if name == "matryoshka_checkpoint":  # SAELens's training encode: the batch top-k
        sae.train()
    close(codes(sae, x), expected[f"saelens/{name}"], f"SAELens {name}")


@pytest.mark.parametrize(
    "fmt", ["gemmascope", "gemmascope2", "llamascope", "goodfire", "qwenscope"]
)
def test_scope_files_match_saelens_loaders(peer_files, fmt: str) -> None:
    out, x, expected = peer_files
    hub = json.loads((out / "hub.json").read_text())[fmt]["res"]
    sae, meta = open_sae(fake_hub_file(out / "hub", hub[0], hub[1]))
    close(codes(sae, x), expected[f"{fmt}/res"], fmt)
    layer = 19 if fmt == "goodfire" else 3
    assert meta["hook_name"] == f"layers.{layer}.resid_post"


def test_peers_read_saekit_files(tmp_path: Path) -> None:
    w = tmp_path / "w"
    x = torch.randn(48, D) * 2 + 0.5
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    ours: dict[str, torch.Tensor] = {}
    meta = {"hook_name": "layers.3.resid_post", "model_name": "org/model"}
    sae = trained("topk", D, F, K, steps=8, normalize_input=True)
    write_format(sae, w / "sparsify", "sparsify", meta)
    ours["sparsify"] = codes(sae, x)
    for rule in ("relu", "topk", "jumprelu"):
        sae = trained(rule, D, F, K, steps=8)
        write_format(sae, w / f"dl_{rule}", "dictionary_learning", meta)
        ours[f"dl_{rule}"] = codes(sae, x)
        write_format(sae, w / f"saelens_{rule}", "saelens", meta)
        ours[f"saelens_{rule}"] = codes(sae, x)
    sae = trained("relu", D, F, K, steps=8, arch=["gated"])  # saekit's Gated SAE
    for fmt, name in (("dictionary_learning", "dl_gated"), ("saelens", "saelens_gated")):
        write_format(sae, w / name, fmt, meta)
        ours[name] = codes(sae, x)
    sae = trained("batchtopk", D, F, K, steps=8, arch=["matryoshka"])
    write_format(sae, w / "saelens_matryoshka", "saelens", meta)
    ours["saelens_matryoshka"] = codes(sae, x)
    hub = tmp_path / "hub"
    g = ("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_9", None)
    sae = trained("jumprelu", D, F, K, steps=8)
    write_format(sae, fake_hub_file(hub, g[0], g[1] + "/x").parent, "gemmascope", meta)
    ours["gemmascope"] = codes(sae, x)
    ll = ("fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L3R-8x", None)
    sae = trained("batchtopk", D, F, K, steps=8)
    write_format(sae, fake_hub_file(hub, ll[0], ll[1] + "/x").parent, "llamascope", meta)
    ours["llamascope"] = codes(sae, x)
    (w / "hub.json").write_text(json.dumps({"gemmascope": g, "llamascope": ll}))
    sae = trained("relu", D, F, K, steps=8)
    write_format(sae, fake_hub_file(hub, GOODFIRE[0], GOODFIRE[1]), "goodfire", meta)
    ours["goodfire"] = codes(sae, x)
    (w / "goodfire.json").write_text(json.dumps([*GOODFIRE, F]))
    # Qwen-Scope: written into the repo folder, whose name holds k (as SAELens's loader wants)
    sae = trained("topk", D, F, K, steps=8)
    path = write_format(sae, fake_hub_file(hub, QWEN[0], "x").parent, "qwenscope", meta)
    assert path.name == QWEN[1]
    qwen = {"qwenscope": list(QWEN)}
    ours["qwenscope"] = codes(sae, x)
    (w / "qwen.json").write_text(json.dumps(qwen))
    sae = trained("jumprelu", D, F, K, steps=8)
    write_format(
        sae, fake_hub_file(hub, GEMMA2[0], f"{GEMMA2[1]}/params.safetensors"), "gemmascope", meta
    )
    ours["gemmascope2"] = codes(sae, x)
    (w / "gemma2.json").write_text(json.dumps(GEMMA2))
    run_peers(READ_SAEKIT_FILES, str(tmp_path), env={"HF_HUB_CACHE": str(hub)})
    got = load_file(str(tmp_path / "got.safetensors"))
    assert set(got) == set(ours)
    for name in ours:
        close(ours[name], got[name], name)


REGISTRY_ONLY = r"""
import sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import torch
from safetensors.torch import load_file, save_file
from sae_lens.loading.pretrained_sae_loaders import (deepseek_r1_sae_huggingface_loader,
    llama_scope_r1_distill_sae_huggingface_loader)
from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor
from sae_lens.saes import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
from saekit.io.native import open_sae
out = Path(sys.argv[1]); x = load_file(str(out / "x.safetensors"))["x"]
D, F = x.shape[1], int(sys.argv[2])
got = {}
cfg, state, _ = deepseek_r1_sae_huggingface_loader("qresearch/DeepSeek-R1-Distill-Llama-8B-SAE-l19",
    "DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt", cfg_overrides={"d_in": D, "d_sae": F})
ref = StandardSAE(StandardSAEConfig(d_in=D, d_sae=F,
                                    apply_b_dec_to_input=cfg["apply_b_dec_to_input"]))
ref.load_state_dict(state)
got["deepseek/saelens"] = ref.encode(x).detach()
sae, meta = open_sae("saelens:deepseek-r1-distill-llama-8b-qresearch/blocks.19.hook_resid_post")
got["deepseek/saekit"] = sae.encode(x).to_dense().detach()
assert meta["hook_name"] == "layers.19.resid_post", meta
release, sae_id = "llama_scope_r1_distill", "l0r_800m_slimpajama"
cfg, state, _ = llama_scope_r1_distill_sae_huggingface_loader("fnlp/Llama-Scope-R1-Distill",
    "800M-Slimpajama-0-OpenR1-Math-220k/L0R")
ref = JumpReLUSAE(JumpReLUSAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"],
                                    apply_b_dec_to_input=False))
ref.load_state_dict(state)
ref.fold_activation_norm_scaling_factor(get_norm_scaling_factor(release, sae_id))  # from_pretrained
got["r1/saelens"] = ref.encode(x).detach()
got["r1/x_hat_saelens"] = ref.decode(ref.encode(x)).detach()
sae, meta = open_sae(f"saelens:{release}/{sae_id}")
got["r1/saekit"] = sae.encode(x).to_dense().detach()
got["r1/x_hat_saekit"] = sae(x).x_hat.detach()
assert meta["hook_name"] == "layers.0.resid_post", meta
save_file({k: v.contiguous() for k, v in got.items()}, str(out / "got.safetensors"))
"""


def test_registry_only_formats_match_saelens_loaders(tmp_path: Path) -> None:
    """DeepSeek-R1 and Llama Scope R1-Distill SAEs: saekit's ``saelens:`` spec (the real
    registry, its norm_scaling_factor) against SAELens's loaders, on a fake hub cache."""
    hub = tmp_path / "hub"
    lin = {"encoder.weight": torch.randn(F, D), "encoder.bias": torch.randn(F) * 0.1}
    lin.update({"decoder.weight": torch.randn(D, F), "decoder.bias": torch.randn(D)})
    repo, name = (
        "qresearch/DeepSeek-R1-Distill-Llama-8B-SAE-l19",
        "DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt",
    )
    torch.save(lin, fake_hub_file(hub, repo, name))
    folder = "800M-Slimpajama-0-OpenR1-Math-220k/L0R"
    r1 = {**lin, "log_jumprelu_threshold": torch.randn(F) * 0.3 - 2}
    save_file(
        r1,
        str(fake_hub_file(hub, "fnlp/Llama-Scope-R1-Distill", f"{folder}/sae_weights.safetensors")),
    )
    cfg = {"d_model": D, "expansion_factor": F // D, "hook_point_in": "blocks.0.hook_resid_post"}
    cfg_path = fake_hub_file(hub, "fnlp/Llama-Scope-R1-Distill", f"{folder}/config.json")
    cfg_path.write_text(json.dumps(cfg))
    x = torch.randn(48, D) * 20  # Llama-scale activations against the registry's factor (53.5)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    run_peers(REGISTRY_ONLY, str(tmp_path), str(F), env={"HF_HUB_CACHE": str(hub)})
    got = load_file(str(tmp_path / "got.safetensors"))
    close(got["deepseek/saekit"], got["deepseek/saelens"], "DeepSeek-R1")
    close(got["r1/saekit"], got["r1/saelens"], "Llama Scope R1-Distill")
    close(got["r1/x_hat_saekit"], got["r1/x_hat_saelens"], "Llama Scope R1-Distill x_hat")
    assert float((got["r1/saekit"] != 0).float().mean()) > 0.05  # not a trivially empty code
