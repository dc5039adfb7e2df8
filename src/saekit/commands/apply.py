"""``saekit steer | ablate | classify | footprint | dashboard``: applications of a trained SAE.

Each command takes a run directory; the model and hook site default to the ones recorded
in its ``cfg.json`` (``--model`` / ``--site`` override them). Every flag is a field of an
options dataclass (:mod:`saekit.apply.options` and the method configs beside the library
functions), so the flags, their checks and their help are declared once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from saekit.cli import add_dataclass_args, dataclass_from_args
from saekit.errors import ConfigError


def _command(sub: argparse._SubParsersAction, name: str, help_: str, func, *classes: type):
    from saekit.apply.options import RunOptions

    p = sub.add_parser(name, help=help_)
    for cls in (RunOptions, *classes):
        add_dataclass_args(p, cls)
    p.set_defaults(func=func)
    return p


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saekit.apply.ablate import AblateConfig
    from saekit.apply.classify import ClassifyConfig
    from saekit.apply.dashboard import DashboardConfig
    from saekit.apply.footprint import FootprintConfig
    from saekit.apply.options import (
        AblateOptions,
        ClassifyOptions,
        DashboardOptions,
        FootprintOptions,
        SteerOptions,
    )

    _command(
        sub,
        "steer",
        "generate with SAE features added / clamped / ablated at the site",
        run_steer,
        SteerOptions,
    )
    _command(
        sub,
        "ablate",
        "next-token loss change when features are ablated",
        run_ablate,
        AblateOptions,
        AblateConfig,
    )
    _command(
        sub,
        "classify",
        "feature rule + sparse probe classifiers from labels",
        run_classify,
        ClassifyOptions,
        ClassifyConfig,
    )
    _command(
        sub,
        "footprint",
        "dataset footprints, redundancy heatmap, subsampling",
        run_footprint,
        FootprintOptions,
        FootprintConfig,
    )
    _command(
        sub,
        "dashboard",
        "static HTML feature dashboards",
        run_dashboard,
        DashboardOptions,
        DashboardConfig,
    )


def _opts(args: argparse.Namespace, *classes: type) -> list[Any]:
    from saekit.apply.options import RunOptions

    return [dataclass_from_args(c, args) for c in (RunOptions, *classes)]


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def run_steer(args: argparse.Namespace) -> int:
    from saekit.apply.common import open_run
    from saekit.apply.options import SteerOptions
    from saekit.apply.steer import parse_feature_spec, steer_compare, top_features

    run, opts = _opts(args, SteerOptions)
    edits = [parse_feature_spec(s) for s in opts.feature]
    app = open_run(run, causal=True)
    results = []
    for prompt in opts.prompt:
        res: dict[str, Any] = {"prompt": prompt}
        if edits:
            res.update(
                steer_compare(
                    app.model,
                    app.tokenizer,
                    app.sae,
                    app.site,
                    prompt,
                    edits,
                    opts.mode,
                    opts.max_new_tokens,
                )
            )
        if opts.top:
            res["top_features"] = top_features(
                app.sae, app.model, app.tokenizer, app.site, prompt, opts.top
            )
        results.append(res)
    if run.as_json:
        _print(results)
        return 0
    for res in results:
        print(f"prompt     : {res['prompt']!r}")
        if edits:
            spec = ", ".join(f"{f}:{v:+g}" for f, v in res["edits"])
            print(f"unsteered  : {res['unsteered']!r}")
            print(f"steered    : {res['steered']!r}   [{res['mode']} {spec} @ {app.site}]")
        for r in res.get("top_features", []):
            print(
                f"  feature {r['feature']:6d}  max {r['max']:+.3f}  mean|f| {r['mean_abs']:.3f}"
                f"  fired on {r['fired_tokens']} tokens"
            )
        print()
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from saekit.apply.ablate import AblateConfig, ablation_effects
    from saekit.apply.common import open_run, read_texts
    from saekit.apply.options import AblateOptions
    from saekit.options import to_dict

    run, opts, cfg = _opts(args, AblateOptions, AblateConfig)
    texts = list(opts.text)
    if opts.data:
        texts += read_texts(opts.data, opts.text_field, opts.limit)
    if not texts:
        raise ConfigError("give --text or --data")
    app = open_run(run, causal=True)
    rep = ablation_effects(
        app.model, app.tokenizer, app.sae, app.site, texts, max_len=app.max_len, **to_dict(cfg)
    )
    if run.as_json:
        _print(rep)
        return 0
    print(f"clean next-token loss {rep['clean_loss']:.4f} on {len(texts)} text(s) at {app.site}")
    print(f"{'feature':>8s} {'loss':>9s} {'delta':>9s}")
    for r in rep["per_feature"]:
        print(f"{r['feature']:8d} {r['loss']:9.4f} {r['delta']:+9.4f}")
    a = rep["all"]
    print(f"{'all':>8s} {a['loss']:9.4f} {a['delta']:+9.4f}  ({len(a['features'])} features)")
    return 0


def run_classify(args: argparse.Namespace) -> int:
    from saekit.apply.classify import ClassifyConfig, classify_texts
    from saekit.apply.common import open_run, read_labelled
    from saekit.apply.options import ClassifyOptions
    from saekit.io.atomic import write_json
    from saekit.options import to_dict

    run, opts, cfg = _opts(args, ClassifyOptions, ClassifyConfig)
    texts, labels = read_labelled(opts.data, opts.text_field, opts.label_field)
    app = open_run(run)
    res = classify_texts(
        app.sae,
        app.model,
        app.tokenizer,
        app.site,
        texts,
        labels,
        max_len=app.max_len,
        **to_dict(cfg),
    ).to_dict()
    if opts.out:
        write_json(opts.out, res)
    if run.as_json:
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
    from saekit.apply.common import open_run, read_texts
    from saekit.apply.footprint import FootprintConfig, footprint_report
    from saekit.apply.options import FootprintOptions
    from saekit.options import to_dict

    run, opts, cfg = _opts(args, FootprintOptions, FootprintConfig)
    data = {n: read_texts(p, opts.text_field, opts.limit) for n, p in _named_datasets(opts.data)}
    app = open_run(run)
    rep = footprint_report(
        app.sae,
        app.model,
        app.tokenizer,
        app.site,
        data,
        opts.out,
        max_len=app.max_len,
        **to_dict(cfg),
    )
    if run.as_json:
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
    print(f"wrote {Path(opts.out) / 'footprint.json'} and {rep['heatmap']}")
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from saekit.apply.common import open_run, read_texts
    from saekit.apply.dashboard import DashboardConfig, build_dashboard, collect
    from saekit.apply.options import DashboardOptions

    run, opts, cfg = _opts(args, DashboardOptions, DashboardConfig)
    app = open_run(run)
    dataset = app.info.dataset if opts.data is None else opts.data
    field = opts.text_field or app.info.text_field
    texts = read_texts(dataset, field, limit=max(1, opts.tokens // 4))
    col = collect(
        app.sae,
        app.model,
        app.tokenizer,
        app.site,
        texts,
        max_len=app.max_len,
        max_tokens=opts.tokens,
    )
    meta = {
        "run": run.run_dir,
        "model": app.model_name or "MiniLM (default)",
        "site": app.site,
        "rule": app.sae.cfg.rule,
        "data": dataset or "built-in pydoc corpus",
    }
    index = build_dashboard(app.sae, col, opts.out, cfg, app.model, app.tokenizer, meta)
    if run.as_json:
        _print({"index": str(index), "n_tokens": col.n_tokens})
    else:
        print(f"wrote {index} ({col.n_tokens} tokens, {len(col.tokens)} texts)")
    return 0
