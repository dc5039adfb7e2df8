"""A ``saekit compress`` run as a library call: load, measure, compress, measure, save.

:func:`compress_run` compresses one model and writes ``OUT/`` (the model, see
:mod:`saekit.compress.io`) with ``report.json``: parameters, size on disk, held-out
perplexity (at the model's full context by default) and forward throughput before and
after, and the per-layer and per-block reports. :func:`table_run` compares methods × ratios
× calibration seeds (mean ± sd). The command in :mod:`saekit.commands.compress` only parses
flags into :class:`~saekit.compress.config.CompressConfig` and
:class:`~saekit.compress.config.CompressRunConfig` and calls these.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from saekit.compress.config import CompressConfig, CompressRunConfig
from saekit.compress.data import (
    batches_of,
    load_texts,
    read_text_file,
    text_tokens,
    token_stream,
    windows,
)
from saekit.compress.io import META, load_compressed, save_compressed, weights_bytes
from saekit.compress.lowrank import count_params
from saekit.compress.metrics import model_context, perplexity, throughput
from saekit.errors import ConfigError, MissingFileError
from saekit.io.atomic import write_json, write_text
from saekit.options import to_dict

Progress = Callable[[str], None] | None


def model_dtype(run: CompressRunConfig, path: Path) -> torch.dtype:
    """``--dtype``: ``auto`` = the checkpoint's dtype on CUDA, float32 elsewhere."""
    if run.dtype != "auto":
        return getattr(torch, run.dtype)
    if not run.device.startswith("cuda"):
        return torch.float32
    from saekit.io.atomic import read_json

    cfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


def load_model(run: CompressRunConfig) -> nn.Module:
    """The causal LM of ``run.model`` (or a saved compressed one) in its dtype, on the device."""
    import transformers

    from saekit.io.paths import reading

    if not run.model:
        raise ConfigError("CompressRunConfig.model is empty: pass --model DIR")
    path = Path(run.model)
    if not path.is_dir():
        raise MissingFileError(f"--model {run.model!r} is not a directory")
    dtype = model_dtype(run, path)
    if (path / META).is_file():
        model = load_compressed(path).to(dtype)
    else:
        with reading(path, "model"):
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(run.device).eval()


def load_tokenizer(run: CompressRunConfig) -> object:
    import transformers

    from saekit.io.paths import reading

    tok_path = Path(run.tokenizer or run.model)
    if not tok_path.is_dir():
        raise MissingFileError(f"--tokenizer {str(tok_path)!r} is not a directory")
    with reading(tok_path, "tokenizer"):
        return transformers.AutoTokenizer.from_pretrained(tok_path)


def calibration_batches(tok: object, run: CompressRunConfig, seed: int | None) -> list[Tensor]:
    """``calib_seqs`` windows of ``seq_len`` tokens from the training text (drawn by ``seed``)."""
    ids = token_stream(tok, load_texts(run.dataset, "train", run.text_field))
    return batches_of(windows(ids, run.seq_len, run.calib_seqs, seed), run.batch_size)


def eval_batches(tok: object, model: nn.Module, run: CompressRunConfig) -> tuple[list, dict]:
    """Perplexity windows: the whole ``eval_file`` (else the held-out text) cut into
    ``eval_seq_len`` windows (0 = the model's full context); (batches, description)."""
    if run.eval_file:
        ids = text_tokens(tok, read_text_file(run.eval_file))
        source = run.eval_file
    else:
        ids = token_stream(tok, load_texts(run.dataset, "test", run.text_field))
        source = f"held-out part of {run.dataset or 'the built-in corpus'}"
    seq_len = run.eval_seq_len or model_context(model)
    seqs = windows(ids, min(seq_len, max(ids.numel(), 2)), run.eval_seqs)
    info = {"source": source, "seq_len": seqs.shape[1], "windows": seqs.shape[0]}
    info["tokens"] = seqs.numel()
    return batches_of(seqs, run.eval_batch_size), info


def measure(model: nn.Module, heldout: list[Tensor], run: CompressRunConfig) -> dict:
    """Parameters, held-out perplexity and (optionally) forward throughput."""
    out = {"params": count_params(model), "ppl": perplexity(model, heldout)}
    if run.throughput:
        out["throughput"] = throughput(model, heldout[:4])
    return out


def _with_device(cfg: CompressConfig, run: CompressRunConfig) -> CompressConfig:
    return cfg if cfg.device else dataclasses.replace(cfg, device=run.device)


def compress_run(run: CompressRunConfig, cfg: CompressConfig, progress: Progress = None) -> dict:
    """Compress ``run.model`` with ``cfg``, save it to ``run.out``; the report (also written
    to ``OUT/report.json``)."""
    from saekit.compress.allocate import sensitivity_ranks
    from saekit.compress.core import compress_model

    if not run.out:
        raise ConfigError("CompressRunConfig.out is empty: pass --out DIR (or --table)")
    cfg = _with_device(cfg, run)
    model, tok = load_model(run), load_tokenizer(run)
    calib = calibration_batches(tok, run, run.calib_seed)
    heldout, eval_info = eval_batches(tok, model, run)
    before = measure(model, heldout, run)
    before["weights_bytes"] = weights_bytes(run.model)
    t0 = time.perf_counter()
    ranks, sens = None, None
    if cfg.allocation == "sensitivity":
        ranks, sens = sensitivity_ranks(model, cfg, calib, progress)
    res = compress_model(model, cfg, calib, progress=progress, ranks=ranks)
    seconds = time.perf_counter() - t0
    after = measure(model, heldout, run)
    report = res.summary()
    report.update(run=to_dict(run), eval=eval_info, compress_seconds=seconds)
    if sens is not None:
        report["sensitivity"] = {n: {str(p): v for p, v in r.items()} for n, r in sens.items()}
    out = Path(run.out)
    after["weights_bytes"] = save_compressed(model, out, report, tok)
    report.update(before=before, after=after)
    write_json(out / "report.json", report)
    return report


def table_run(run: CompressRunConfig, cfg: CompressConfig, progress: Progress = None) -> dict:
    """Every method in ``run.methods`` at every ratio and calibration seed (fresh model each).

    With ``run.out``, writes ``table.json`` (rows, summary, run, eval) and ``table.md``.
    """
    from saekit.compress.bench import compare_methods, markdown_table

    cfg = _with_device(cfg, run)
    tok = load_tokenizer(run)
    model = load_model(run)
    heldout, eval_info = eval_batches(tok, model, run)
    del model
    res = compare_methods(
        lambda: load_model(run),
        lambda seed: calibration_batches(tok, run, seed),
        heldout,
        tuple(run.methods),
        tuple(run.ratios),
        tuple(run.seeds),
        cfg,
        progress=progress,
    )
    res.update(run=to_dict(run), eval=eval_info)
    if run.out:
        write_json(Path(run.out) / "table.json", res)
        write_text(Path(run.out) / "table.md", markdown_table(res) + "\n")
    return res
