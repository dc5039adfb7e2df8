"""The defects of issue 16 reproduced on the code before the fix (run with PYTHONPATH=old src)."""
import copy, sys, tempfile, torch
sys.path.insert(0, "/work/wt/compress/tests")
from compress_helpers import batches, gpt2, llama, perturb
import saekit.compress as sc
from saekit.compress import CompressConfig, compress_model, save_compressed
print("saekit.compress from", sc.__file__)
# 1. from_pretrained on a saved directory
from transformers import AutoModelForCausalLM
m = llama(2); perturb(m); data = batches(2)
compress_model(m, CompressConfig(method="saes", ratio=0.4, grid=0), data)
d = tempfile.mkdtemp()
save_compressed(m, d)
try:
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        diff = (hf(data[0]).logits - m(data[0]).logits).abs().max().item()
    print("1. from_pretrained without remote code: loaded, max logit diff", diff)
except Exception as e:
    print("1. from_pretrained refused:", type(e).__name__)
# 3. block forwards
from saekit.compress.lowrank import find_linear_layers
for L in (2, 4, 8):
    model = llama(L)
    calls = [0]
    for i in range(L):
        model.model.layers[i].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    compress_model(model, CompressConfig(method="saes", ratio=0.5, grid=0), batches(2))
    print(f"3. L={L}: {calls[0]} block forwards for 2 batches")
# 6. teacher in train mode
base = gpt2(2, attn_pdrop=0.5, resid_pdrop=0.5, embd_pdrop=0.5); perturb(base)
outs = []
for mode in ("train", "eval"):
    model = copy.deepcopy(base); teacher = copy.deepcopy(base); perturb(teacher, 2.0); teacher.train(mode == "train")
    torch.manual_seed(0)
    compress_model(model, CompressConfig(method="saes", ratio=0.5, grid=0), batches(2), teacher=teacher)
    outs.append(model.get_submodule("transformer.h.1.mlp.c_fc").A.detach().clone())
print("6. teacher train vs eval mode give the same factors:", torch.equal(outs[0], outs[1]))
print("7. rank_for_ratio(32, 32, 0.0) =", sc.rank_for_ratio(32, 32, 0.0))
import saekit.compress.data as dd, saekit.compress.factor as ff
print("7. second split constant:", getattr(dd, "HELDOUT_EVERY", None), "| whitened_target present:", hasattr(ff, "whitened_target"))
