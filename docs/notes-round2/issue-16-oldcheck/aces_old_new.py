import sys, importlib.util, torch
sys.path.insert(0, "/work/wt/compress/tests")
from test_compress_aces import _synthetic_layer
from saekit.compress.aces import aces_beta, grid_beta
spec = importlib.util.spec_from_file_location("oldfactor", "/tmp/old/src/saekit/compress/factor.py")
old = importlib.util.module_from_spec(spec); sys.modules["oldfactor"] = old; spec.loader.exec_module(old)
print("| layer | exact-grid β (901 pts) | ρ grid | old ACES β | ρ old | new ACES β | ρ new |")
for seed in range(8):
    _, _, _, G0, G1 = _synthetic_layer(seed, [0.1, 0.3, 1.0][seed % 3])
    bg, rg = grid_beta(G0, G1, 6, 0.9, 901)
    bo = old.aces_beta(G0, G1, 6, 0.9)
    ro = old.retained_energy(G0 + bo * G1, 6)
    n = aces_beta(G0, G1, 6, 0.9)
    print(f"| {seed} | {bg:.3f} | {rg:.6f} | {bo:.3f} | {ro:.6f} | {n.beta:.3f} | {n.rho:.6f} |")
