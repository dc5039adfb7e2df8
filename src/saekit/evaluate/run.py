"""Evaluate a run directory: every applicable metric on fresh data, baselines, report, plots.

:func:`evaluate_run` loads the SAE (:func:`saekit.io.load_sae`) and the ``DataConfig`` from
``cfg.json``'s ``saekit`` section, and builds an evaluation source on data the SAE was not
trained on:

* ``synthetic``: the same generator (same dictionary) with a different sample stream,
  ``stream_seed = 1_000_003 + config seed + EvalConfig.seed``;
* ``hf`` on the built-in corpus or a local .txt/.jsonl: the held-out ``eval`` part of
  :func:`saekit.sources.text.iter_texts`, in text order, one pass at most; for an HF
  dataset id, ``EvalConfig.eval_split`` (e.g. ``test``) when given, else the training split
  (reported as not fresh);
* anything else (e.g. ``cache``): :func:`saekit.sources.build_source` with another seed
  (reported as not fresh).

The first ``pca_fit_tokens`` eval tokens are buffered: they give the L0 used by the
baselines, and the PCA baseline is fitted on them (in-sample for those tokens, which can
only favour PCA). Then every eval token updates the streaming accumulators of the SAE and
of the baselines; nothing else is held in memory. Every section of the result has its
``n_tokens``; weight-only sections (``ground_truth``, ``independence``) have 0.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.arch import arch_sites, site_inputs_of, views, widths
from saekit.config import DataConfig, device_problem
from saekit.errors import ConfigError, DataError, FormatError, MissingFileError
from saekit.evaluate import afa, baselines, ground_truth, independence, plots, report
from saekit.evaluate.core import CoreAccumulator
from saekit.io.atomic import json_safe, read_json, write_json, write_text
from saekit.io.paths import check_writable_dir
from saekit.options import Options, option
from saekit.sources.base import ActivationSource, Batch

EVAL_STREAM_OFFSET = 1_000_003


@dataclass
class EvalConfig(Options):
    """What ``saekit eval`` measures and on how many tokens."""

    tokens: int = option(
        65_536, "eval tokens for the core / AFA / ground-truth / ablation metrics", ge=1
    )
    batch_size: int = option(1024, "tokens per SAE batch", ge=1)
    splice_tokens: int = option(
        8192, "real tokens for spliced CE / KL (decoder LMs only; 0: skip)", ge=0
    )
    splice_batch_size: int = option(
        0, "sequences per spliced forward (0: the run's model batch)", ge=0
    )
    splice_special: bool = option(
        False,
        "splice the reconstruction at special tokens (BOS, ...) too and count them; default:"
        " they keep their activation and leave the averages (SAEBench's"
        " exclude_special_tokens_from_reconstruction), as training drops them",
    )
    pca_fit_tokens: int = option(16_384, "first eval tokens used to fit the PCA baseline", ge=1)
    baselines: bool = option(True, "also evaluate the random-decoder SAE and PCA baselines")
    plots: bool = option(True, "write PNG plots")
    probe_data: str = option("", "labelled JSONL (text, label) for sparse probing ('' : skip)")
    eval_split: str = option("", "HF dataset split for evaluation ('' : the training split)")
    afa_center: bool = option(False, "AFA with z = x - b_dec and no bias atom (paper: False)")
    dense_threshold: float = option(
        0.1, "a latent is dense when its density exceeds this", ge=0, le=1
    )
    seed: int = option(0, "seed of the evaluation stream and the random baseline", ge=0)
    device: str = option("cpu", "device of the SAE during evaluation", check=device_problem)


@dataclass
class _Src:
    source: ActivationSource
    description: str
    fresh: bool
    kind: str
    notes: list[str] = field(default_factory=list)
    text_part: str | None = None
    text_split: str = "train"


def _is_local_text(dataset: str) -> bool:
    return dataset == "" or Path(dataset).expanduser().is_file()


def eval_source(
    data_cfg: DataConfig, cfg: EvalConfig, model: Any = None, tokenizer: Any = None
) -> _Src:
    """The evaluation source for ``data_cfg`` (see the module docstring)."""
    if data_cfg.source == "synthetic":
        from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

        scfg = SyntheticConfig.from_dict(dict(data_cfg.synthetic))
        stream = EVAL_STREAM_OFFSET + scfg.seed + cfg.seed
        src = SyntheticSource(scfg, stream_seed=stream)
        desc = f"synthetic ({scfg.n_features} features, d={scfg.d}), stream seed {stream}"
        return _Src(src, desc, True, "synthetic")
    if data_cfg.source == "saelens_synthetic":  # a fresh sample stream of the same model
        from saekit.sources.saelens_synthetic import SAELensSyntheticSource

        opts = dict(data_cfg.synthetic)
        opts["seed"] = EVAL_STREAM_OFFSET + int(opts.get("seed", 0)) + cfg.seed
        src = SAELensSyntheticSource(opts)
        return _Src(src, f"SAELens synthetic model, stream seed {opts['seed']}", True, "synthetic")
    if data_cfg.source == "hf":
        from saekit.sources.hf import HFSource

        dc = dataclasses.replace(data_cfg, shuffle_buffer=0, inputs=[], device=cfg.device)
        notes: list[str] = []
        if _is_local_text(dc.dataset):
            part, split = "eval", dc.dataset_split
            fresh = split.lower() != "all"
            if not fresh:
                notes.append("trained on split 'all': the held-out part was seen in training")
        elif cfg.eval_split:
            part, fresh, split = None, True, cfg.eval_split
            dc = dataclasses.replace(dc, dataset_split=split)
        else:
            part, fresh, split = None, False, dc.dataset_split
            notes.append(
                f"evaluated on the training split {split!r} of {dc.dataset!r}: pass"
                " --eval-split for held-out data"
            )
        src = HFSource(dc, seed=cfg.seed, model=model, tokenizer=tokenizer, part=part)
        name = dc.dataset or "built-in pydoc corpus"
        desc = f"{dc.model or 'MiniLM'} on {name} ({'held-out part' if part else split})"
        return _Src(src, desc, fresh, "hf", notes, part, split)
    from saekit.sources import build_source

    src = build_source(data_cfg, cfg.seed + 1)
    note = f"source {data_cfg.source!r} has no held-out part: evaluated on training data"
    return _Src(src, f"{data_cfg.source} source", False, data_cfg.source, [note])


def _take(src: _Src, batch_size: int, n_tokens: int):
    """Batches until ``n_tokens``; for text, one pass at most: the batch during which the
    text wraps around is dropped, so no token is seen twice."""
    n = 0
    while n < n_tokens:
        try:
            b = src.source.next_batch(min(batch_size, n_tokens - n))
        except StopIteration:
            return
        if src.kind == "hf" and getattr(src.source, "epoch", 0) > 0:
            # the text wrapped around while this batch was made: drop it (no repeats)
            src.notes.append(f"held-out text exhausted: evaluated on its first {n} tokens")
            return
        n += next(iter(b.acts.values())).shape[0]
        yield b


class _Evaluator:
    """All streaming accumulators of one autoencoder (SAE or baseline)."""

    def __init__(
        self,
        ae: Any,
        cfg: EvalConfig,
        gt: tuple[Tensor, Tensor] | None,
        full: bool,
        metric: Tensor | None = None,
        reads_target: bool = False,
    ) -> None:
        self.ae, self.full = ae, full
        #: the baseline reconstructs the target from the target (PCA of a transcoder's
        #: output: the best rank-L0 linear code of the output itself)
        self.reads_target = reads_target
        self.down = DownstreamAccumulator(metric) if metric is not None else None
        self.core = CoreAccumulator(getattr(ae, "d_out", ae.d_in), ae.d_sae, cfg.dense_threshold)
        #: sections of the SAE's architecture parts (saekit.arch: per-prefix, per-layer FVE)
        arch = getattr(ae, "arch", None)
        self.arch = arch.eval_accumulators(ae) if full and arch is not None else {}
        self.afa = afa.AFAAccumulator(ae, center=cfg.afa_center) if full else None
        self.abl = independence.AblationAccumulator(ae) if full else None
        self.det = self.absorb = None
        self.W = ae.W_dec if hasattr(ae, "W_dec") else getattr(ae, "U", None)
        if gt is not None and hasattr(ae, "W_dec"):  # PCA codes are dense: no detection
            G, parent = gt
            self.det = ground_truth.DetectionAccumulator(self.W, G)
            self.absorb = ground_truth.AbsorptionAccumulator(self.W, G, parent)

    @torch.no_grad()
    def update(
        self,
        x: Tensor,
        true_codes: Tensor | None,
        inputs: dict[str, Tensor],
        target: Tensor | None = None,
    ) -> None:
        """One eval batch: ``x`` the input, ``target`` what it reconstructs (None: ``x``)."""
        y = x if target is None else target
        src = y if self.reads_target else x
        out = self.ae(src, inputs=inputs) if inputs else self.ae(src)
        self.core.update(y, out.x_hat, out.codes)
        for acc in self.arch.values():
            acc.update(self.ae, x, y, out)
        if self.down is not None:
            self.down.update(y, out.x_hat)
        if self.afa is not None:
            z = out.x_in if self.afa.center else out.x
            self.afa.update_from(z, out.codes)
        if self.abl is not None:
            self.abl.update(y, out.x_hat, out.codes)
        if true_codes is not None and self.det is not None and self.absorb is not None:
            self.det.update(out.codes, true_codes)
            self.absorb.update(out.codes, true_codes)

    def result(self, G: Tensor | None) -> dict[str, Any]:
        r: dict[str, Any] = {"core": self.core.result()}
        if hasattr(self.ae, "dead_latents") and int(self.ae.tokens_seen) > 0:
            # the training-time definition (aux loss, logs), from the saved counters
            r["core"]["dead_frac_train"] = float(self.ae.dead_latents().float().mean())
            r["core"]["dead_tokens"] = self.ae.dead_window
        if self.down is not None:
            r["downstream"] = self.down.result()
        for name, acc in self.arch.items():
            r[name] = acc.result()
        if self.afa is not None:
            r["afa"] = self.afa.result()
        if self.abl is not None:
            r["ablation"] = self.abl.result()
        if self.W is not None and hasattr(self.ae, "W_dec"):
            r["independence"] = {**independence.decoder_independence(self.W), "n_tokens": 0}
        if G is not None and hasattr(self.ae, "W_dec"):  # not PCA: r atoms, not comparable
            r["ground_truth"] = {**ground_truth.dictionary_metrics(self.W, G), "n_tokens": 0}
        if self.det is not None and self.det.n:
            r["detection"] = self.det.result()
        if self.absorb is not None and self.absorb.n:
            r["absorption"] = self.absorb.result()
        return r


class DownstreamAccumulator:
    """``fvu_down = sum_t e_t M e_t / sum_t (x_t - mu) M (x_t - mu)``: the reconstruction error
    under a downstream loss's metric ``M`` (synthetic data with a known downstream loss),
    ``e = x - x_hat`` and ``mu`` the mean over all eval tokens (streaming-exact)."""

    def __init__(self, metric: Tensor) -> None:
        self.M = metric.double()
        self.err = self.xmx = 0.0
        self.sum_x = torch.zeros(metric.shape[0], dtype=torch.float64)
        self.n = 0

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, e = x.double().cpu(), (x - x_hat).double().cpu()
        self.err += float(((e @ self.M) * e).sum())
        self.xmx += float(((x @ self.M) * x).sum())
        self.sum_x += x.sum(0)
        self.n += x.shape[0]

    def result(self) -> dict[str, Any]:
        mu = self.sum_x / max(self.n, 1)
        var = self.xmx - self.n * float(mu @ self.M @ mu)
        return {"fvu_down": self.err / var if var > 0 else float("nan"), "n_tokens": self.n}


@dataclass
class _Setup:
    """What every evaluation phase reads: the SAE, its data and the evaluation source."""

    run_dir: Path
    out: Path
    sae: Any
    data_cfg: DataConfig
    src: _Src
    site: str
    G: Tensor | None  # the true dictionary (synthetic data), else None
    gt: tuple[Tensor, Tensor] | None  # (dictionary, parent index) for detection/absorption


def _setup(
    run_dir: Path,
    out: Path,
    cfg: EvalConfig,
    model: Any,
    tokenizer: Any,
    data_cfg: DataConfig | None,
    k: int | None,
) -> _Setup:
    """Phase 1: load the SAE and its DataConfig, build the evaluation source, pick the site.

    ``run_dir`` is the SAE's local path; an SAE from another library (a peer format, a hub
    spec) gets its model and site from its metadata (:func:`saekit.io.native.info_from_meta`).
    """
    from saekit.io.native import info_from_meta, open_sae, read_run_info

    sae, meta = open_sae(run_dir, device=cfg.device, k=k)
    sae.train(False)
    info = read_run_info(run_dir) if meta["format"] == "saekit" else info_from_meta(run_dir, meta)
    if data_cfg is None:
        if not info.saekit.get("data"):
            where = run_dir / "cfg.json" if run_dir.is_dir() else run_dir
            raise FormatError(
                f"{where} records no saekit 'data' section: cannot rebuild its data; pass"
                " the model and hook site (saekit eval --model NAME --site layers.N.KIND)"
            )
        data_cfg = info.data_config()
    check_writable_dir(out, "eval output directory")
    src = eval_source(data_cfg, cfg, model, tokenizer)
    site = (info.site if info else "") or data_cfg.sites[0]
    if site not in src.source.sites:
        site = src.source.sites[0]
    ins, outs = arch_sites(sae.cfg, site)
    missing = [s for s in (*ins, *outs) if s not in src.source.sites]
    if missing:
        src.source.close()
        raise DataError(f"the evaluation source lacks the site(s) {missing} the SAE reads")
    got = widths(sae.cfg, site, src.source.d_in)
    if got != (sae.d_in, sae.d_out):
        src.source.close()
        raise DataError(
            f"site(s) {ins} -> {outs} have widths {got}, the SAE (d_in, d_out)"
            f" {(sae.d_in, sae.d_out)}"
        )
    wanted = set(getattr(sae, "requires", ()))
    if wanted:  # named inputs the rule reads (gtopk: "grad"), when the source has them
        src.source.request_inputs(wanted)
    G = getattr(src.source, "dictionary", None)
    parent = getattr(src.source, "parent", None)
    gt = None
    if G is not None:
        gt = (G, parent if parent is not None else torch.full((G.shape[0],), -1))
    return _Setup(run_dir, out, sae, data_cfg, src, site, G, gt)


def _stream(st: _Setup, cfg: EvalConfig) -> tuple[dict[str, _Evaluator], dict[str, Any]]:
    """Phase 2: one pass over the eval tokens feeding the SAE's and the baselines' accumulators.

    The first ``pca_fit_tokens`` are buffered: they give the L0 of the baselines and fit PCA.
    A transcoder's PCA baseline is PCA of its target at the same L0 (our choice: the best
    rank-L0 linear code of the output itself, a demanding floor).
    """
    sae = st.sae

    def xs(b: Batch) -> tuple[Tensor, Tensor | None]:
        return views(sae.cfg, st.site, b.acts)[0].to(cfg.device).float(), b.meta.get("codes")

    def target(b: Batch) -> Tensor | None:
        y = views(sae.cfg, st.site, b.acts)[1]
        return None if y is None else y.to(cfg.device).float()

    def inputs(b: Batch) -> dict[str, Tensor]:
        got = site_inputs_of(sae.cfg, st.site, b.inputs, getattr(st.sae, "requires", ()))
        return {n: t.to(cfg.device).float() for n, t in got.items()}

    ins, outs = arch_sites(sae.cfg, st.site)
    transcoding = ins != outs  # the target is another site's activations
    stream = _take(st.src, cfg.batch_size, cfg.tokens)
    buffered: list[Batch] = []
    n_buf, fit_tokens = 0, min(cfg.pca_fit_tokens, cfg.tokens)
    for b in stream:
        buffered.append(b)
        n_buf += b.acts[st.site].shape[0]
        if n_buf >= fit_tokens:
            break
    if not buffered:
        raise DataError(f"the evaluation source yielded no tokens for site {st.site!r}")
    with torch.no_grad():
        l0s = [sae.encode(xs(b)[0], inputs(b)).l0().double() for b in buffered]
        l0_est = float(torch.cat(l0s).mean())
    metric = getattr(st.src.source, "downstream_metric", None)
    evals = {"sae": _Evaluator(sae, cfg, st.gt, full=True, metric=metric)}
    base_models: dict[str, Any] = {}
    if cfg.baselines:
        base_models["random"] = baselines.random_sae(sae, seed=cfg.seed, l0=l0_est).to(cfg.device)
        fit = [target(b) if transcoding else xs(b)[0] for b in buffered]
        base_models["pca"] = baselines.fit_pca(fit, sae.d_out, l0_est)
        for name, m in base_models.items():
            on_target = transcoding and name == "pca"
            evals[name] = _Evaluator(m, cfg, st.gt, False, metric, reads_target=on_target)
    for b in itertools.chain(buffered, stream):  # the rest of the stream is never held
        x, codes = xs(b)
        y, named = target(b), inputs(b)
        for e in evals.values():
            e.update(x, codes, named if hasattr(e.ae, "rule") else {}, y)  # SAEs take inputs
    return evals, base_models


def _results(
    st: _Setup, cfg: EvalConfig, evals: dict[str, _Evaluator], base_models: dict[str, Any]
) -> dict[str, Any]:
    """The result sections of phase 2."""
    sae, src = st.sae, st.src
    result: dict[str, Any] = {
        "run_dir": str(st.run_dir),
        "site": st.site,
        "sae_info": {"rule": sae.cfg.rule, "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.cfg.k},
        "data": {"description": src.description, "fresh": src.fresh, "kind": src.kind},
        "eval_config": dataclasses.asdict(cfg),
        "sae": evals["sae"].result(st.G),
        "baselines": {n: evals[n].result(st.G) for n in base_models},
    }
    if base_models:
        result["baselines_info"] = baselines.describe(
            base_models.get("pca"), base_models.get("random")
        )
    return result


def _splice(
    st: _Setup, cfg: EvalConfig, base_models: dict[str, Any], result: dict[str, Any]
) -> None:
    """Phase 3: spliced CE / KL on real text (decoder LMs), for the SAE and the baselines."""
    src = st.src
    if src.kind != "hf":
        return
    if not getattr(src.source, "causal", False) or cfg.splice_tokens <= 0:
        if not getattr(src.source, "causal", False):
            src.notes.append("spliced CE/KL skipped: the model is not a causal LM")
        return
    from saekit.evaluate.splice import splice_metrics, token_batches
    from saekit.sources.text import config_texts

    dc = st.data_cfg
    source: Any = src.source
    texts = config_texts(dc, split=src.text_split, part=src.text_part)
    bs = cfg.splice_batch_size or dc.model_batch_size
    special = getattr(source.tokenizer, "all_special_ids", None) or []
    counted = [] if cfg.splice_special else special
    batches = token_batches(source.tokenizer, texts, dc.context_len, bs, cfg.splice_tokens, counted)
    ins, outs = arch_sites(st.sae.cfg, st.site)
    if len(ins) != 1 or len(outs) != 1:
        src.notes.append(f"spliced CE/KL skipped: the SAE reads {ins} and writes {outs}")
        return
    # a transcoder replaces its target site with its prediction from its input site; its PCA
    # baseline (fitted on the target) reads the target itself
    reads = {} if ins == outs else {"sae": ins[0], "sae_err": ins[0], "base:random": ins[0]}
    sp = splice_metrics(
        source.model, st.sae, outs[0], batches, base_models, special, cfg.splice_special, reads
    )
    for name, r in sp.pop("baselines", {}).items():
        result["baselines"][name]["splice"] = r
    result["sae"]["splice"] = sp


def _probe(st: _Setup, cfg: EvalConfig) -> dict[str, Any]:
    """Phase 4: sparse probing on ``cfg.probe_data`` (HF runs)."""
    if st.src.kind != "hf":
        raise ConfigError("sparse probing needs a run on an HF model (source 'hf')")
    from saekit.evaluate.probing import probe_run

    source: Any = st.src.source
    return probe_run(
        source.model,
        source.tokenizer,
        st.sae,
        st.site,
        cfg.probe_data,
        context_len=st.data_cfg.context_len,
        seed=cfg.seed,
    )


def _write(
    st: _Setup, cfg: EvalConfig, result: dict[str, Any], evals: dict[str, _Evaluator]
) -> dict[str, Any]:
    """Phase 5: plots, ``report.md`` and ``eval.json`` (each written atomically)."""
    out = st.out
    images: dict[str, str] = {}
    if cfg.plots:
        core = result["sae"]["core"]
        images["feature density"] = plots.density_histogram(
            core["density_hist"], out / "density_hist.png"
        ).name
        images["L0 distribution"] = plots.l0_histogram(
            evals["sae"].core.l0_histogram(), out / "l0_hist.png"
        ).name
        a = evals["sae"].afa
        if a is not None and a.n:
            nz, nf = a.points(cfg.seed)
            images["ZF plot"] = plots.zf_plot(nz.tolist(), nf.tolist(), out / "zf_plot.png").name
    result["files"] = ["eval.json", "report.md", *images.values()]
    result = json_safe(result)
    write_text(out / "report.md", report.render(result, images))
    write_json(out / "eval.json", result)
    from saekit import tracking

    tracking.log_eval(st.run_dir, result)  # the run's --log tracker, if it has one
    return result


def _where(run_dir: str | Path, out_dir: str | Path | None) -> tuple[Path, Path]:
    """The SAE's local path (hub specs resolved) and the output directory."""
    from saekit.io.hub import is_remote, resolve

    if out_dir is None and is_remote(run_dir):
        raise ConfigError(f"{run_dir} is read-only (a hub cache): pass an output directory (--out)")
    path = resolve(run_dir).path
    default_out = path if not path.is_file() else path.with_name(path.name + ".eval")
    return path, Path(out_dir) if out_dir is not None else default_out


def evaluate_run(
    run_dir: str | Path,
    n_tokens: int | None = None,
    out_dir: str | Path | None = None,
    probe_data: str | Path | None = None,
    cfg: EvalConfig | None = None,
    model: Any = None,
    tokenizer: Any = None,
    data_cfg: DataConfig | None = None,
    k: int | None = None,
) -> dict[str, Any]:
    """Evaluate the SAE in ``run_dir``; writes ``eval.json``, ``report.md`` and PNGs.

    ``n_tokens`` / ``probe_data`` override ``cfg``. ``model``/``tokenizer``: a preloaded
    model for HF runs (else loaded from the run's ``DataConfig.model``). ``run_dir`` may
    be any SAE :func:`saekit.io.native.open_sae` reads (a peer format, a file, ``hf://`` /
    ``saelens:``); an SAE file's outputs go to ``<file>.eval/``, a hub SAE's need
    ``out_dir``. Without a saekit ``data`` section the model and site come from the SAE's
    metadata, else ``data_cfg`` (the model, site and text it reads) is required. ``k``: for
    files that do not store it.
    Phases: set-up, one streaming pass (core, AFA, ablation, ground truth, baselines),
    spliced CE/KL, probing, files.
    """
    cfg = dataclasses.replace(cfg or EvalConfig())
    if n_tokens is not None:
        cfg.tokens = n_tokens
    if probe_data is not None:
        cfg.probe_data = str(probe_data)
    run_dir, out = _where(run_dir, out_dir)
    st = _setup(run_dir, out, cfg, model, tokenizer, data_cfg, k)
    try:
        evals, base_models = _stream(st, cfg)
        result = _results(st, cfg, evals, base_models)
        _splice(st, cfg, base_models, result)
        if cfg.probe_data:
            result["sae"]["probing"] = _probe(st, cfg)
        result["notes"] = list(st.src.notes)
        return _write(st, cfg, result, evals)
    finally:
        st.src.source.close()


def load_eval(run_dir: str | Path) -> dict[str, Any]:
    """The ``eval.json`` of a run (FileNotFoundError with a hint when missing)."""
    p = Path(run_dir)
    p = p if p.suffix == ".json" else p / "eval.json"
    if not p.is_file():
        raise MissingFileError(f"{p} not found: run `saekit eval {p.parent}` first")
    return read_json(p)


def compare_runs(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    evaluate_missing: bool = True,
    cfg: EvalConfig | None = None,
) -> dict[str, Any]:
    """Table of several runs (evaluating those without ``eval.json``) + frontier PNGs."""
    if not run_dirs:
        raise ConfigError("compare needs at least one run directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, names = [], []
    for rd in run_dirs:
        p = Path(rd)
        if not (p / "eval.json").is_file():
            if not evaluate_missing:
                raise MissingFileError(f"{p / 'eval.json'} not found")
            evaluate_run(p, cfg=cfg)
        results.append(load_eval(p))
        names.append(p.name or str(p))
    table = report.compare_table(results, names)
    points = []
    for res, name in zip(results, names):
        for kind, sec in [("sae", res.get("sae", {}))] + sorted(res.get("baselines", {}).items()):
            points.append(
                {
                    "name": name if kind == "sae" else f"{name}:{kind}",
                    "kind": kind,
                    "L0": sec.get("core", {}).get("l0"),
                    "FVE": sec.get("core", {}).get("fve"),
                    "CE recovered": (sec.get("splice") or {}).get("ce_recovered"),
                }
            )
    files = ["compare.md", "compare.json"]
    plots.frontier(points, "L0", "FVE", out / "frontier_l0_fve.png", "L0 vs FVE")
    files.append("frontier_l0_fve.png")
    if any(p["CE recovered"] is not None for p in points):
        plots.frontier(
            points, "L0", "CE recovered", out / "frontier_l0_ce.png", "L0 vs CE recovered"
        )
        files.append("frontier_l0_ce.png")
    md = (
        "# saekit compare\n\n"
        + table
        + "\n\n"
        + "\n".join(f"![{f}]({f})" for f in files if f.endswith(".png"))
        + "\n"
    )
    write_text(out / "compare.md", md)
    summary = {"runs": [str(r) for r in run_dirs], "table": table, "points": points, "files": files}
    write_json(out / "compare.json", json_safe(summary))
    return summary
