"""The layers of tests/test_compress_regressions.py::test_aces_beta_maximises_the_exact_ratio:
exact-grid optimum vs the β that saes_factor picks (run with PYTHONPATH at old or new src)."""
import sys, torch
sys.path.insert(0, "/work/wt/compress/tests")
from test_compress_regressions import FINE, _naive_rho
from compress_helpers import data
import saekit.compress as sc
print("saekit from", sc.__file__)
grid = torch.linspace(0, 0.9, FINE, dtype=torch.float64).tolist()
print("| layer | grid β | ρ grid | chosen β | ρ chosen | gap |")
for seed in range(8):
    W, X = data(24, 16, 200, seed)
    g = torch.Generator().manual_seed(100 + seed)
    Xf = X + [0.1, 0.3, 1.0][seed % 3] * float(X.std()) * torch.randn(X.shape, generator=g, dtype=X.dtype)
    H, D = X @ X.T / X.shape[1], (Xf - X) @ X.T / X.shape[1]
    _, _, info = sc.saes_factor(W, H, D, 6, beta="aces", beta_max=0.9)
    rhos = _naive_rho(W, H, D, 6, grid); b = max(range(FINE), key=rhos.__getitem__)
    (r,) = _naive_rho(W, H, D, 6, [info.beta])
    print(f"| {seed} | {grid[b]:.3f} | {rhos[b]:.7f} | {info.beta:.3f} | {r:.7f} | {rhos[b]-r:.1e} |")
