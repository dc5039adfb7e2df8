"""``saekit compress``: low-rank compression (SVD, ASVD, SVD-LLM, SAES-SVD) of a causal LM."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saekit.errors import ConfigError, MissingFileError
from saekit.io.paths import reading


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saekit.cli import add_dataclass_args
    from saekit.compress.core import CompressConfig

    p = sub.add_parser(
        "compress",
        help="low-rank compress a causal LM's linear layers (svd, asvd, svdllm, saes)",
        description="Compress every linear layer inside the transformer blocks to rank "
        "⌊mn(1−ratio)/(m+n)⌋, report held-out perplexity before/after, and save the model "
        "(safetensors + compression.json; reload with saekit.compress.load_compressed). "
        "With --table, compare all methods at several ratios instead.",
    )
    p.add_argument("--model", required=True, help="local transformers causal-LM directory")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: --model)")
    p.add_argument("--out", default="", help="output directory (model, report.json / table.json)")
    p.add_argument("--dataset", default="", help="text dataset ('' = built-in pydoc corpus)")
    p.add_argument("--text-field", default="text", help="text column of --dataset")
    p.add_argument("--calib-seqs", type=int, default=64, help="calibration sequences")
    p.add_argument("--eval-seqs", type=int, default=0, help="held-out sequences (0 = all)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--table", action="store_true", help="compare methods × ratios")
    p.add_argument(
        "--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6], help="ratios for --table"
    )
    p.add_argument(
        "--methods", nargs="+", default=["svd", "asvd", "svdllm", "saes"], help="for --table"
    )
    add_dataclass_args(p, CompressConfig)
    p.set_defaults(func=run)


def load_model_and_tokenizer(model_path: str, tokenizer_path: str = "", device: str = "cpu"):
    """A local causal LM (or a saved compressed one) in fp32 and its tokenizer."""
    import transformers

    from saekit.compress.io import META, load_compressed

    path = Path(model_path)
    if not path.is_dir():
        raise MissingFileError(f"--model {model_path!r} is not a directory")
    if (path / META).is_file():
        model = load_compressed(path, device=device)
    else:
        with reading(path, "model"):
            model = transformers.AutoModelForCausalLM.from_pretrained(path)
        model = model.float().to(device).eval()  # CPU default fp32
    tok_path = Path(tokenizer_path or model_path)
    if not tok_path.is_dir():
        raise MissingFileError(f"--tokenizer {str(tok_path)!r} is not a directory")
    with reading(tok_path, "tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_path)
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    from saekit.cli import dataclass_from_args
    from saekit.compress.bench import compare_methods, markdown_table
    from saekit.compress.core import CompressConfig
    from saekit.compress.data import chunk_batches, load_texts, token_stream
    from saekit.compress.io import save_compressed

    cfg = dataclass_from_args(CompressConfig, args)
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device)
    calib = chunk_batches(
        token_stream(tok, load_texts(args.dataset, "train", args.text_field)),
        args.seq_len,
        args.batch_size,
        args.calib_seqs,
    )
    heldout = chunk_batches(
        token_stream(tok, load_texts(args.dataset, "test", args.text_field)),
        args.seq_len,
        args.batch_size,
        args.eval_seqs,
    )
    out = Path(args.out) if args.out else None
    if args.table:
        res = compare_methods(
            model,
            calib,
            heldout,
            tuple(args.methods),
            tuple(args.ratios),
            cfg,
            progress=lambda s: print(s, flush=True),
        )
        table = markdown_table(res)
        print(table)
        if out:
            from saekit.io.atomic import write_text

            out.mkdir(parents=True, exist_ok=True)
            (out / "table.json").write_text(json.dumps(res, indent=2))
            write_text(out / "table.md", table + "\n")
            print(f"wrote {out / 'table.json'} and {out / 'table.md'}")
        return 0
    if out is None:
        raise ConfigError("--out is required (or use --table)")
    import copy

    from saekit.compress.core import compress_model
    from saekit.compress.metrics import layer_output_errors, perplexity

    reference = copy.deepcopy(model)
    ppl0 = perplexity(model, heldout)
    res = compress_model(model, cfg, calib, teacher=reference)
    errs = layer_output_errors(model, reference, list(res.layers), heldout[:2])
    report = res.summary()
    report.update(ppl_original=ppl0, ppl_compressed=perplexity(model, heldout), layer_out_err=errs)
    size = save_compressed(model, out, report, tok)
    report["weights_bytes"] = size
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(
        f"{cfg.method} ratio={cfg.ratio}: params {res.params_before} -> {res.params_after}, "
        f"held-out ppl {ppl0:.3f} -> {report['ppl_compressed']:.3f}, "
        f"weights {size / 1e6:.2f} MB, saved to {out}"
    )
    return 0
