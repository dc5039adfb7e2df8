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

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.config import DataConfig, SAEConfig, from_dict, to_dict
from saekit.errors import ConfigError, DataError, FormatError, MissingFileError
from saekit.io.atomic import load_tensors, read_json, save_tensors, write_json
from saekit.io.integrity import check_seal, file_records, seal, verify_files
from saekit.io.saelens import base_cfg, load_state, log10_density, sae_from_saelens, saelens_export
from saekit.rules import rule_names
from saekit.sae import SAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
STATE_FILE = "saekit_state.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
#: where cfg.json keeps the digest of its own canonical JSON
CFG_SEAL = ("saekit", "cfg_sha256")
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
    site = str(extra.get("site", ""))
    try:
        cfg, weights = saelens_export(sae, site=site, data=data)
        refused = None
    except FormatError as e:  # the rule has no SAELens equivalent: saekit-only directory
        cfg, weights, refused = base_cfg(sae, site=site, data=data), sae.folded_weights(), str(e)
        warnings.warn(f"{run_dir}: not loadable by SAELens: {e}", stacklevel=2)
    save_tensors(run_dir / WEIGHTS_FILE, weights, metadata={"format": "pt"})
    state = {k: v for k, v in sae.state_dict().items()}
    if not sae.cfg.normalize_input:  # folded == raw bit for bit: do not store them twice
        for n in WEIGHT_NAMES:
            if n in weights:  # (a gated SAE's SAELens file names b_enc b_gate)
                state.pop(n)
    save_tensors(run_dir / STATE_FILE, state)
    dens = sae.fire_freq if density is None else density
    save_tensors(run_dir / SPARSITY_FILE, {"sparsity": log10_density(dens)})
    import saekit

    cfg["saekit"] = {
        "version": saekit.__version__,
        "sae": to_dict(sae.cfg),
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "rule_module": type(sae.rule).__module__,
        **extra,
    }
    if refused is not None:
        cfg["saekit"]["saelens_export"] = f"refused: {refused}"
    cfg["saekit"]["files"] = file_records(run_dir, (WEIGHTS_FILE, STATE_FILE, SPARSITY_FILE))
    write_json(run_dir / CFG_FILE, seal(cfg, CFG_SEAL))
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


def verify_run(run_dir: str | Path, verify: bool = True) -> dict:
    """The checked ``cfg.json`` of a saekit run: its seal and every recorded file's digest.

    ``verify=False`` checks file sizes only. Runs written before digests were recorded, and
    plain SAELens directories, have nothing to check.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    section = cfg.get("saekit")
    if isinstance(section, dict):
        if verify:
            check_seal(cfg, run_dir / CFG_FILE, CFG_SEAL)
        if "files" in section:
            verify_files(run_dir, section["files"], verify)
    return cfg


def _sae_from_saekit(run_dir: Path, cfg: dict, device: str, k: int | None) -> SAE:
    section = cfg["saekit"]
    where = run_dir / CFG_FILE
    if not isinstance(section, dict) or not isinstance(section.get("sae"), dict):
        raise FormatError(f"{where}: the 'saekit' section has no 'sae' config")
    rule = section["sae"].get("rule", "topk")
    if isinstance(rule, str) and rule not in rule_names():
        mod = section.get("rule_module")
        raise ConfigError(
            f"{where}: unknown rule {rule!r}; a rule of your own must be imported first"
            " (saekit --plugin MODULE, SAEKIT_PLUGINS=MODULE, or import it in Python)"
            + (f"; it was saved from module {mod!r}" if mod else "")
        )
    sae_cfg = from_dict(SAEConfig, section["sae"], where=f"{where} saekit.sae")
    if k is not None:
        sae_cfg.k = k
    try:
        with torch.random.fork_rng(devices=[]):
            sae = SAE(sae_cfg)
    except (ConfigError, DataError, TypeError, RuntimeError) as e:
        raise FormatError(f"{where}: the saved SAE config cannot be built: {e}") from e
    dtype = getattr(torch, str(section.get("dtype", "float32")), None)
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
    path: str | Path,
    device: str = "cpu",
    k: int | None = None,
    train: bool = False,
    verify: bool = True,
) -> SAE:
    """Load an SAE from a saekit or SAELens run directory, a peer format or the hub.

    ``path``: a local directory or file (saekit, SAELens, sparsify, dictionary_learning,
    Gemma Scope, Llama Scope, Goodfire, Qwen-Scope; detected from the files, see
    :mod:`saekit.io.formats`), ``hf://ORG/REPO/SUBPATH`` or ``saelens:RELEASE/SAE_ID``
    (:mod:`saekit.io.hub`). ``k``: for Qwen-Scope files (not stored there), or overrides the
    saved ``k``. The SAE is returned in eval mode unless ``train``. ``verify``: check the
    SHA-256 digests that saekit recorded in ``cfg.json`` (an IntegrityError names a corrupt
    file); False checks sizes only.
    """
    return open_sae(path, device, k, train, verify)[0]


def open_sae(
    path: str | Path,
    device: str = "cpu",
    k: int | None = None,
    train: bool = False,
    verify: bool = True,
) -> tuple[SAE, dict[str, Any]]:
    """:func:`load_sae` and the SAE's metadata (SAELens keys: ``model_name``,
    ``hook_name``, ..., plus ``format`` and, for hub specs, ``source``)."""
    from saekit.io.hub import resolve

    res = resolve(path)
    p = res.path
    if not p.exists():
        raise MissingFileError(f"SAE not found: {p}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"k must be a positive integer (latents kept per token), got {k!r}")
    if p.is_file() and (p.name == CFG_FILE or p.name == WEIGHTS_FILE):
        p = p.parent
    meta: dict[str, Any]
    if p.is_dir() and (p / CFG_FILE).is_file() and (p / WEIGHTS_FILE).is_file():
        cfg = read_run_config(p)
        if "saekit" in cfg:
            verify_run(p, verify)
            sae = _sae_from_saekit(p, cfg, device, k)
            meta = {"format": "saekit"}
        else:
            sae = sae_from_saelens(cfg, load_tensors(p / WEIGHTS_FILE), k).to(device)
            meta = {"format": "saelens"}
        meta.update(_saelens_meta(cfg))
    else:
        from saekit.io.formats import detect_format, read_foreign

        if "format" not in res.hints and detect_format(p) is None and p.is_dir():
            if (p / WEIGHTS_FILE).is_file():
                read_run_config(p)  # names the missing cfg.json
            if (p / CFG_FILE).is_file():
                read_run_config(p)  # a clear error for a broken cfg.json first
                _refuse_pickles(p)
        sae, meta = read_foreign(p, k, res.hints)
        sae = sae.to(device)
    if res.hints.get("model"):  # a registry's model id outranks a TransformerLens name
        meta["model_name"] = res.hints["model"]
    if res.spec != str(path) or res.hints:
        meta["source"] = res.spec
    meta.setdefault("path", str(p))
    sae.train(train)
    return sae, meta


def _saelens_meta(cfg: dict) -> dict[str, Any]:
    """``model_name`` / ``hook_name`` / ... from a SAELens cfg (top level or metadata)."""
    out: dict[str, Any] = {}
    for key in ("model_name", "hook_name", "context_size", "dataset_path", "neuronpedia_id"):
        for sec in (cfg, cfg.get("metadata") or {}, cfg.get("meta") or {}):
            if isinstance(sec, dict) and sec.get(key) is not None:
                out[key] = sec[key]
                break
    return out


def load_density(run_dir: str | Path, verify: bool = True) -> Tensor:
    """Per-latent firing density from ``sparsity.safetensors`` (checked like :func:`load_sae`)."""
    from saekit.io.saelens import density_from_log10

    if (Path(run_dir) / CFG_FILE).is_file():
        verify_run(run_dir, verify)
    return density_from_log10(load_tensors(Path(run_dir) / SPARSITY_FILE)["sparsity"])


@dataclass
class RunInfo:
    """What a run directory's ``cfg.json`` says about where its SAE was trained."""

    run_dir: str
    model: str = ""
    site: str = ""
    dataset: str = ""
    text_field: str = "text"
    context_len: int = 128
    #: the ``DataConfig`` as saved (``{}`` for plain SAELens directories)
    data: dict[str, Any] = field(default_factory=dict)
    #: the whole ``saekit`` section (``{}`` for plain SAELens directories)
    saekit: dict[str, Any] = field(default_factory=dict)

    def data_config(self) -> DataConfig:
        """The run's :class:`DataConfig` (validated), or FormatError when none is recorded."""
        where = Path(self.run_dir) / CFG_FILE
        if not isinstance(self.saekit.get("data"), dict):
            raise FormatError(f"{where} has no saekit 'data' section: cannot rebuild its data")
        return from_dict(DataConfig, self.saekit["data"], where=f"{where} saekit.data")


def _find_data_cfg(sk: dict) -> dict:
    for key in ("data", "data_cfg", "DataConfig", "data_config"):
        if isinstance(sk.get(key), dict):
            return sk[key]
    return {}


def read_run_info(run_dir: str | Path) -> RunInfo:
    """Model, hook site and data recorded in ``run_dir/cfg.json`` (saekit or SAELens keys)."""
    p = Path(run_dir)
    if not (p / CFG_FILE).is_file():
        raise MissingFileError(f"not a saekit run directory (no {CFG_FILE}): {p}")
    cfg = read_run_config(p)
    sk = cfg["saekit"] if isinstance(cfg.get("saekit"), dict) else {}
    data = _find_data_cfg(sk)
    sites = data.get("sites") or []
    site = sk.get("site") or (sites[0] if len(sites) == 1 else "")
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    if not site and isinstance(hook, str):
        from saekit.sources.sites import canonical_site

        site = canonical_site(hook) if canonical_site(hook).startswith("layers.") else ""
    return RunInfo(
        run_dir=str(p),
        model=str(data.get("model", cfg.get("model_name", "")) or ""),
        site=str(site),
        dataset=str(data.get("dataset", "")),
        text_field=str(data.get("text_field", "text")),
        context_len=int(data.get("context_len", 128)),
        data=data,
        saekit=dict(sk),
    )


def info_from_meta(spec: str | Path, meta: dict[str, Any]) -> RunInfo:
    """The :class:`RunInfo` of an SAE from another library (a peer format, a hub spec).

    The site is the recorded hook (TransformerLens names translated,
    :func:`saekit.sources.sites.canonical_site`), the data an HF source on the recorded model
    and the built-in corpus [our choice: the SAE's training dataset is usually a hub dataset,
    not available offline; commands that read text take ``--data`` / ``--dataset``]. Its
    ``data_config()`` is a FormatError naming ``--model`` / ``--site`` when the metadata
    lacks the model or the hook.
    """
    from saekit.sources.sites import canonical_site

    hook = meta.get("hook_name")
    site = canonical_site(str(hook)) if hook else ""
    data: dict[str, Any] = {"source": "hf", "model": str(meta.get("model_name") or "")}
    if site:
        data["sites"] = [site]
    if isinstance(meta.get("context_size"), int):
        data["context_len"] = int(meta["context_size"])
    known = bool(data["model"] and site)
    return RunInfo(
        run_dir=str(spec),
        model=data["model"],
        site=site,
        context_len=int(data.get("context_len", 128)),
        data=data,
        saekit={"data": data, "site": site, "foreign": meta} if known else {"foreign": meta},
    )
