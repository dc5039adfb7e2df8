"""``saekit steer | ablate | classify | footprint | dashboard``: applications of a trained SAE.

Each command takes a run directory; the model and hook site default to the ones recorded
in its ``cfg.json`` (``--model`` / ``--site`` override them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from saekit.errors import ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory with cfg.json + weights")
    p.add_argument("--model", default=None, help="HF id or local path (default: the run's)")
    p.add_argument("--site", default=None, help="hook site, e.g. layers.3.resid_post")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", default="float32", help="model dtype")
    p.add_argument("--max-len", type=int, default=0, help="tokens per text (0: the run's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "steer", help="generate with SAE features added / clamped / ablated at the site"
    )
    _common(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="I:V",
        help="feature and value, e.g. 12:4.0 or 7:-2 (repeatable)",
    )
    p.add_argument("--mode", choices=["add", "clamp", "ablate"], default="add")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--top", type=int, default=0, help="also list the N top features per prompt")
    p.set_defaults(func=run_steer)

    p = sub.add_parser("ablate", help="next-token loss change when features are ablated")
    _common(p)
    p.add_argument("--text", action="append", default=[], help="text (repeatable)")
    p.add_argument("--data", default="", help="a .txt / .jsonl file of texts instead")
    p.add_argument("--text-field", default="text")
    p.add_argument("--limit", type=int, default=64, help="at most this many texts from --data")
    p.add_argument("--features", type=int, nargs="+", default=None, help="features to ablate")
    p.add_argument("--top-n", type=int, default=10, help="without --features: top-n by firing")
    p.add_argument(
        "--keep-error",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=True,
        metavar="BOOL",
        help="keep the SAE error term (default true)",
    )
    p.set_defaults(func=run_ablate)

    p = sub.add_parser("classify", help="feature rule + sparse probe classifiers from labels")
    _common(p)
    p.add_argument("--data", required=True, help="JSONL with text and label fields")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--positive", default=None, help="positive label (default: the larger)")
    p.add_argument("--pool", choices=["max", "mean"], default="max")
    p.add_argument("--rank-by", choices=["rate", "mean"], default="rate")
    p.add_argument("--test-size", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rule-max-features", type=int, default=3)
    p.add_argument("--probe", choices=["topk", "l1"], default="topk")
    p.add_argument("--probe-k", type=int, default=16)
    p.add_argument("--probe-c", type=float, default=1.0)
    p.add_argument("--out", default="", help="also write the result JSON here")
    p.set_defaults(func=run_classify)

    p = sub.add_parser("footprint", help="dataset footprints, redundancy heatmap, subsampling")
    _common(p)
    p.add_argument("--data", nargs="+", required=True, help="datasets: PATH or NAME=PATH")
    p.add_argument("--text-field", default="text")
    p.add_argument("--limit", type=int, default=0, help="at most this many texts per dataset")
    p.add_argument("--threshold", type=float, default=0.0, help="|activation| threshold")
    p.add_argument("--min-samples", type=int, default=1, help="samples a feature needs")
    p.add_argument("--subsample", type=int, default=0, help="coverage-preserving subsample size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run_footprint)

    p = sub.add_parser("dashboard", help="static HTML feature dashboards")
    _common(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data", default=None, help="texts (.txt/.jsonl); default: the run's data")
    p.add_argument("--text-field", default=None)
    p.add_argument("--features", type=int, default=30, help="features to render")
    p.add_argument("--feature-ids", type=int, nargs="+", default=None, help="render these")
    p.add_argument("--select", choices=["random", "dense"], default="random")
    p.add_argument("--tokens", type=int, default=20000, help="tokens to collect")
    p.add_argument("--top", type=int, default=20, help="top contexts per feature")
    p.add_argument("--context", type=int, default=5, help="tokens either side")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_dashboard)


def _setup(args: argparse.Namespace, causal: bool | None = None) -> tuple[Any, ...]:
    from saekit.apply.common import load_model, load_run

    sae, info = load_run(args.run_dir)
    sae = sae.to(args.device)
    model_name = info.model if args.model is None else args.model
    site = args.site or info.site
    if not site:
        raise ConfigError(f"{args.run_dir} does not record a single hook site: pass --site")
    model, tok = load_model(model_name, causal=causal, device=args.device, dtype=args.dtype)
    max_len = args.max_len or info.context_len
    return sae, info, model, tok, site, max_len


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def run_steer(args: argparse.Namespace) -> int:
    from saekit.apply.steer import parse_feature_spec, steer_compare, top_features

    edits = [parse_feature_spec(s) for s in args.feature]
    if not edits and not args.top:
        raise ConfigError("give at least one --feature I:V (or --top N to list features)")
    sae, info, model, tok, site, max_len = _setup(args, causal=True)
    results = []
    for prompt in args.prompt:
        res: dict[str, Any] = {"prompt": prompt}
        if edits:
            res.update(
                steer_compare(model, tok, sae, site, prompt, edits, args.mode, args.max_new_tokens)
            )
        if args.top:
            res["top_features"] = top_features(sae, model, tok, site, prompt, args.top)
        results.append(res)
    if args.json:
        _print(results)
        return 0
    for res in results:
        print(f"prompt     : {res['prompt']!r}")
        if edits:
            spec = ", ".join(f"{f}:{v:+g}" for f, v in res["edits"])
            print(f"unsteered  : {res['unsteered']!r}")
            print(f"steered    : {res['steered']!r}   [{res['mode']} {spec} @ {site}]")
        for r in res.get("top_features", []):
            print(
                f"  feature {r['feature']:6d}  max {r['max']:+.3f}  mean|f| {r['mean_abs']:.3f}"
                f"  fired on {r['fired_tokens']} tokens"
            )
        print()
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from saekit.apply.ablate import ablation_effects
    from saekit.apply.common import read_texts

    texts = list(args.text)
    if args.data:
        texts += read_texts(args.data, args.text_field, args.limit)
    if not texts:
        raise ConfigError("give --text or --data")
    sae, info, model, tok, site, max_len = _setup(args, causal=True)
    rep = ablation_effects(
        model, tok, sae, site, texts, args.features, args.top_n, args.keep_error, max_len
    )
    if args.json:
        _print(rep)
        return 0
    print(f"clean next-token loss {rep['clean_loss']:.4f} on {len(texts)} text(s) at {site}")
    print(f"{'feature':>8s} {'loss':>9s} {'delta':>9s}")
    for r in rep["per_feature"]:
        print(f"{r['feature']:8d} {r['loss']:9.4f} {r['delta']:+9.4f}")
    a = rep["all"]
    print(f"{'all':>8s} {a['loss']:9.4f} {a['delta']:+9.4f}  ({len(a['features'])} features)")
    return 0


def run_classify(args: argparse.Namespace) -> int:
    from saekit.apply.classify import classify_texts
    from saekit.apply.common import read_labelled

    texts, labels = read_labelled(args.data, args.text_field, args.label_field)
    sae, info, model, tok, site, max_len = _setup(args)
    res = classify_texts(
        sae,
        model,
        tok,
        site,
        texts,
        labels,
        positive=args.positive,
        pool=args.pool,
        max_len=max_len,
        test_size=args.test_size,
        seed=args.seed,
        rank_by=args.rank_by,
        rule_max_features=args.rule_max_features,
        probe=args.probe,
        probe_k=args.probe_k,
        probe_c=args.probe_c,
    ).to_dict()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
    if args.json:
        _print(res)
        return 0
    print(f"positive label {res['positive']!r}: {res['n_train']} train / {res['n_test']} test")
    for name in ("rule", "probe"):
        m = res[name]["test"]
        what = res["rule"]["rule"] if name == "rule" else f"{res['probe']['n_features']} features"
        print(
            f"{name:5s} P {m['precision']:.3f} R {m['recall']:.3f} F1 {m['f1']:.3f}"
            f" acc {m['accuracy']:.3f}   {what}"
        )
    c = res["chance"]
    print(
        f"chance: majority acc {c['majority_accuracy']:.3f},"
        f" all-positive F1 {c['all_positive_f1']:.3f}"
    )
    return 0


def _named_datasets(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep:
            name, path = Path(s).stem, s
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"dataset names must be unique, got {names}: use NAME=PATH")
    return out


def run_footprint(args: argparse.Namespace) -> int:
    from saekit.apply.common import read_texts
    from saekit.apply.footprint import footprint_report

    data = {n: read_texts(p, args.text_field, args.limit) for n, p in _named_datasets(args.data)}
    sae, info, model, tok, site, max_len = _setup(args)
    rep = footprint_report(
        sae,
        model,
        tok,
        site,
        data,
        args.out,
        args.threshold,
        args.min_samples,
        args.subsample,
        args.seed,
        max_len,
    )
    if args.json:
        _print(rep)
        return 0
    names = rep["names"]
    for n in names:
        d = rep["datasets"][n]
        print(f"{n}: {d['samples']} samples, footprint {d['footprint_size']} features")
    w = max(len(n) for n in names)
    print("redundancy |F(A)∩F(B)|/|F(A)| (rows A, columns B):")
    print(" " * (w + 1) + " ".join(f"{n[:8]:>8s}" for n in names))
    for n, row in zip(names, rep["redundancy"]):
        cells = " ".join("     nan" if v is None else f"{v:8.3f}" for v in row)
        print(f"{n:>{w}s} {cells}")
    print(f"wrote {Path(args.out) / 'footprint.json'} and {rep['heatmap']}")
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from saekit.apply.common import read_texts
    from saekit.apply.dashboard import DashboardConfig, build_dashboard, collect

    sae, info, model, tok, site, max_len = _setup(args)
    dataset = info.dataset if args.data is None else args.data
    field = args.text_field or info.text_field
    texts = read_texts(dataset, field, limit=max(1, args.tokens // 4))
    col = collect(sae, model, tok, site, texts, max_len=max_len, max_tokens=args.tokens)
    cfg = DashboardConfig(
        n_features=args.features,
        feature_ids=args.feature_ids or [],
        select=args.select,
        n_top=args.top,
        context=args.context,
        seed=args.seed,
    )
    meta = {
        "run": args.run_dir,
        "model": (info.model if args.model is None else args.model) or "MiniLM (default)",
        "site": site,
        "rule": sae.cfg.rule,
        "data": dataset or "built-in pydoc corpus",
    }
    index = build_dashboard(sae, col, args.out, cfg, model, tok, meta)
    if args.json:
        _print({"index": str(index), "n_tokens": col.n_tokens})
    else:
        print(f"wrote {index} ({col.n_tokens} tokens, {len(col.tokens)} texts)")
    return 0
