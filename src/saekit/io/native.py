"""saekit's run directory: a SAELens-compatible SAE plus saekit's exact state.

A run directory holds

* ``cfg.json``: the SAELens fields (see :mod:`saekit.io.saelens`) and a ``"saekit"``
  section ``{"version", "sae": SAEConfig, "site", "data", "train", ...}``;
* ``sae_weights.safetensors``: exactly ``W_enc [d_in, d_sae]``, ``b_enc``,
  ``W_dec [d_sae, d_in]``, ``b_dec`` and, for rules with an inference threshold,
  ``threshold [d_sae]``; folded (raw activations in, raw out), so SAELens can load it;
* ``saekit_state.safetensors``: every other tensor of the SAE's ``state_dict`` (rule
  parameters and buffers, firing statistics, ``input_scale``), plus the unfolded weights
  when ``normalize_input`` is on (folding is not exactly invertible);
* ``sparsity.safetensors``: ``sparsity = log10(feature density + 1e-10)``.

:func:`load_sae` returns an SAE equal to the saved one to the bit. It also reads plain
SAELens directories and Qwen-Scope ``.pt`` files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.config import SAEConfig, from_dict, to_dict
from saekit.errors import FormatError, MissingFileError
from saekit.io.atomic import load_tensors, read_json, save_tensors, write_json
from saekit.io.saelens import load_state, log10_density, sae_from_saelens, saelens_cfg
from saekit.sae import SAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
STATE_FILE = "saekit_state.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def save_sae(
    sae: SAE,
    run_dir: str | Path,
    extra_cfg: dict | None = None,
    density: Tensor | None = None,
) -> Path:
    """Write ``sae`` to ``run_dir`` (each file atomically; ``cfg.json`` last).

    ``extra_cfg`` goes into the ``saekit`` section (e.g. ``{"site": ..., "data": {...},
    "train": {...}}``); its ``site`` and ``data.model`` also fill SAELens's metadata.
    ``density``: per-latent firing density for ``sparsity.safetensors`` (default: the
    SAE's ``fire_freq`` EMA).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra_cfg or {})
    data = extra.get("data") if isinstance(extra.get("data"), dict) else {}
    weights = sae.folded_weights()
    save_tensors(run_dir / WEIGHTS_FILE, weights, metadata={"format": "pt"})
    state = {k: v for k, v in sae.state_dict().items()}
    if not sae.cfg.normalize_input:  # folded == raw bit for bit: do not store them twice
        for n in WEIGHT_NAMES:
            state.pop(n)
    save_tensors(run_dir / STATE_FILE, state)
    dens = sae.fire_freq if density is None else density
    save_tensors(run_dir / SPARSITY_FILE, {"sparsity": log10_density(dens)})
    cfg = saelens_cfg(sae, site=str(extra.get("site", "")), data=data)
    import saekit

    cfg["saekit"] = {
        "version": saekit.__version__,
        "sae": to_dict(sae.cfg),
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        **extra,
    }
    write_json(run_dir / CFG_FILE, cfg)
    return run_dir


def read_run_config(run_dir: str | Path) -> dict:
    """The parsed ``cfg.json`` of a run directory."""
    cfg = read_json(Path(run_dir) / CFG_FILE)
    if not isinstance(cfg, dict):
        raise FormatError(f"{Path(run_dir) / CFG_FILE}: expected a JSON object")
    return cfg


def _refuse_pickles(run_dir: Path) -> None:
    found = sorted(p.name for p in run_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    raise MissingFileError(
        f"{run_dir / WEIGHTS_FILE} not found"
        + (
            f"; found {found}, which need unpickling: saekit only reads safetensors"
            " (or Qwen-Scope tensor dicts via load_sae('<file>.pt'))"
            if found
            else ""
        )
    )


def _sae_from_saekit(run_dir: Path, cfg: dict, device: str, k: int | None) -> SAE:
    section = cfg["saekit"]
    if not isinstance(section, dict) or not isinstance(section.get("sae"), dict):
        raise FormatError(f"{run_dir / CFG_FILE}: the 'saekit' section has no 'sae' config")
    sae_cfg = from_dict(SAEConfig, section["sae"], where=f"{run_dir / CFG_FILE} saekit.sae")
    if k is not None:
        sae_cfg.k = k
    with torch.random.fork_rng(devices=[]):
        sae = SAE(sae_cfg)
    dtype = getattr(torch, section.get("dtype", "float32"), None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"{run_dir / CFG_FILE}: unknown dtype {section.get('dtype')!r}")
    sae.to(dtype)
    weights = load_tensors(run_dir / WEIGHTS_FILE)
    state = load_tensors(run_dir / STATE_FILE)
    full = {n: weights[n] for n in WEIGHT_NAMES if n in weights}
    full.update(state)
    load_state(sae, full, strict=True, where=str(run_dir))
    return sae.to(device)


def load_sae(
    path: str | Path, device: str = "cpu", k: int | None = None, train: bool = False
) -> SAE:
    """Load an SAE from a saekit or SAELens run directory, or a Qwen-Scope ``.pt`` file.

    ``k``: for Qwen-Scope files (not stored there), or overrides the saved ``k``. The SAE
    is returned in eval mode unless ``train``.
    """
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"SAE not found: {p}")
    if p.is_file():
        if p.name == CFG_FILE or p.suffix == ".safetensors":
            return load_sae(p.parent, device, k, train)
        from saekit.io.qwenscope import load_qwenscope

        sae = load_qwenscope(p, k).to(device)
    else:
        cfg = read_run_config(p)
        if not (p / WEIGHTS_FILE).is_file():
            _refuse_pickles(p)
        if "saekit" in cfg:
            sae = _sae_from_saekit(p, cfg, device, k)
        else:
            sae = sae_from_saelens(cfg, load_tensors(p / WEIGHTS_FILE), k).to(device)
    sae.train(train)
    return sae


def load_density(run_dir: str | Path) -> Tensor:
    """Per-latent firing density from ``sparsity.safetensors``."""
    from saekit.io.saelens import density_from_log10

    return density_from_log10(load_tensors(Path(run_dir) / SPARSITY_FILE)["sparsity"])


def run_info(run_dir: str | Path) -> dict[str, Any]:
    """The ``saekit`` section of a run's cfg (empty for plain SAELens dirs)."""
    return dict(read_run_config(run_dir).get("saekit") or {})
