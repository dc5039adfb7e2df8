"""Static HTML feature dashboards (no server, no external assets).

:func:`collect` runs the model over texts and keeps every nonzero code (text, position,
feature, value); :func:`build_dashboard` writes

- ``index.html``: every rendered feature with its density, max activation and top token, in
  a table listed by density (highest first) and sortable by clicking a header (a small
  inline script, allowed by a CSP hash; ``index.html#sort=max-desc`` sorts on load), and a
  log10-density histogram of all features;
- ``features/<i>.html``: top activating contexts (±``context`` tokens, background intensity
  ∝ |activation| / max; red positive, blue negative, for signed rules), quantile-sampled
  contexts (``n_quantiles`` equal-count groups of the nonzero activations, ``per_quantile``
  seeded samples each), an activation histogram (inline SVG), density, the nearest decoder
  neighbours by cosine and, for models with an LM head, the top promoted / suppressed tokens
  by the direct effect ``d_i · W_U`` (no final norm, as in sae_vis).

Every token string is passed through ``html.escape``; pages also carry a Content Security
Policy that forbids any script except the index's sorting script.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from saekit.apply.common import decoder_directions, dense_codes, site_activations, unembedding
from saekit.errors import ConfigError, DataError
from saekit.io.atomic import json_safe, write_json, write_text
from saekit.options import Options, option
from saekit.sae import SAE


@dataclass
class DashboardConfig(Options):
    """What to render."""

    n_features: int = option(
        30, "features to render (ignored when feature_ids is given)", ge=1, flag="features"
    )
    feature_ids: list[int] = option([], "render these features", metavar="F")
    select: str = option(
        "random",
        "random (seeded, among fired features) or dense (most frequent)",
        choices=("random", "dense"),
    )
    n_top: int = option(20, "top contexts per feature", ge=1, flag="top")
    n_quantiles: int = option(10, "activation quantiles with examples", ge=1)
    per_quantile: int = option(5, "examples per quantile", ge=0)
    context: int = option(5, "tokens either side of an example", ge=0)
    bins: int = option(50, "histogram bins", ge=1)
    n_neighbours: int = option(8, "nearest decoder directions listed", ge=0)
    n_logits: int = option(10, "promoted / suppressed tokens listed", ge=0)
    seed: int = option(0, "seed of the random feature choice", ge=0)
    neuronpedia: bool = option(
        False, "also write OUT/neuronpedia/batch-N.json, Neuronpedia's upload format"
    )
    features_per_batch: int = option(128, "features per Neuronpedia batch file", ge=1)


@dataclass
class Collected:
    """Token strings per text and the nonzero codes as parallel arrays."""

    tokens: list[list[str]]
    seq: np.ndarray
    pos: np.ndarray
    feat: np.ndarray
    val: np.ndarray
    n_tokens: int
    d_sae: int


@torch.no_grad()
def collect(
    sae: SAE,
    model: nn.Module,
    tok: Any,
    site: str,
    texts: list[str],
    max_len: int = 128,
    max_tokens: int = 0,
    batch_size: int = 8,
) -> Collected:
    """Nonzero codes of (non-special) tokens of ``texts``; stop after ``max_tokens`` (0: all)."""
    if max_tokens > 0:  # cheap pre-cut: texts rarely have fewer tokens than characters / 8
        budget, kept = 0, []
        for t in texts:
            kept.append(t)
            budget += min(max_len, max(1, len(t) // 8))
            if budget >= max_tokens * 2:
                break
        texts = kept
    recs = site_activations(model, tok, site, texts, max_len=max_len, batch_size=batch_size)
    tokens, seqs, poss, feats, vals = [], [], [], [], []
    n = 0
    for r in recs:
        keep = r.keep.clone()
        if max_tokens > 0:
            left = max_tokens - n
            if left <= 0:
                break
            idx = torch.nonzero(keep)[:, 0]
            keep[idx[left:]] = False
        codes = dense_codes(sae, r.acts)
        codes[~keep] = 0
        p, f = torch.nonzero(codes, as_tuple=True)
        s = len(tokens)
        tokens.append(r.tokens)
        seqs.append(np.full(len(p), s, dtype=np.int64))
        poss.append(p.numpy())
        feats.append(f.numpy())
        vals.append(codes[p, f].numpy())
        n += int(keep.sum())
    if n == 0:
        raise DataError("no tokens to collect (empty texts?)")
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return Collected(
        tokens,
        cat(seqs, np.int64),
        cat(poss, np.int64),
        cat(feats, np.int64),
        cat(vals, np.float32),
        n,
        sae.d_sae,
    )


# ---------------------------------------------------------------------------- html helpers
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1100px;color:#222}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#f4f4f4}.ctx{font-family:monospace;white-space:pre-wrap;
margin:2px 0;line-height:1.6}.ctx span{border-radius:2px}.c{outline:1px solid #333}
.v{color:#666;font-size:90%;margin-right:8px}.muted{color:#777}h2{margin-top:1.4em}
"""


def esc(s: object) -> str:
    """HTML-escape ``s`` (quotes too) and make whitespace visible."""
    return html.escape(str(s), quote=True).replace("\n", "↵").replace("\t", "⇥")


def _csp(script: str | None) -> str:
    src = "'none'"
    if script is not None:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        src = f"'sha256-{digest}'"
    pol = f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src {src}"
    return f'<meta http-equiv="Content-Security-Policy" content="{pol}">'


def _page(title: str, body: str, script: str | None = None) -> str:
    js = f"<script>{script}</script>" if script is not None else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"{_csp(script)}<title>{esc(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}{js}</body></html>\n"
    )


def _colour(v: float, vmax: float) -> str:
    a = 0.0 if vmax <= 0 else min(1.0, abs(v) / vmax)
    rgb = "255,80,0" if v >= 0 else "0,110,255"
    return f"background:rgba({rgb},{a * 0.85:.3f})"


def svg_histogram(
    values: np.ndarray, bins: int = 50, title: str = "", log_counts: bool = False
) -> str:
    """An inline SVG bar histogram of ``values`` (red for >= 0, blue for < 0 bin centres)."""
    W, H, pad = 460, 150, 24
    if len(values) == 0:
        return f"<p class='muted'>{esc(title)}: no values</p>"
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        lo, hi = lo - max(abs(lo) * 1e-3, 1e-6), hi + max(abs(hi) * 1e-3, 1e-6)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    h = np.log10(counts + 1) if log_counts else counts.astype(float)
    top = max(float(h.max()), 1e-9)
    bw = (W - 2 * pad) / bins
    bars = []
    for i, c in enumerate(h):
        bh = (H - 2 * pad) * c / top
        centre = (edges[i] + edges[i + 1]) / 2
        fill = "#e85a1a" if centre >= 0 else "#1a6ee8"
        bars.append(
            f"<rect x='{pad + i * bw:.1f}' y='{H - pad - bh:.1f}' width='{max(bw - 1, 0.5):.1f}'"
            f" height='{bh:.1f}' fill='{fill}'><title>[{edges[i]:.3g}, {edges[i + 1]:.3g}):"
            f" {int(counts[i])}</title></rect>"
        )
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' role='img'>"
        f"<text x='{pad}' y='14' font-size='12'>{esc(title)}</text>{''.join(bars)}"
        f"<line x1='{pad}' y1='{H - pad}' x2='{W - pad}' y2='{H - pad}' stroke='#333'/>"
        f"<text x='{pad}' y='{H - 6}' font-size='10'>{lo:.3g}</text>"
        f"<text x='{W - pad}' y='{H - 6}' font-size='10' text-anchor='end'>{hi:.3g}</text>"
        "</svg>"
    )


_SORT_JS = """(function(){
var t=document.getElementById('feats');if(!t)return;var b=t.tBodies[0];
function key(r,c){var v=r.cells[c].getAttribute('data-v');var n=parseFloat(v);
return isNaN(n)?v:n;}
function sortBy(c,desc){var rows=Array.prototype.slice.call(b.rows);
rows.sort(function(x,y){var a=key(x,c),z=key(y,c);return (a<z?-1:a>z?1:0)*(desc?-1:1);});
rows.forEach(function(r){b.appendChild(r);});
t.setAttribute('data-sorted',c+(desc?'-desc':'-asc'));}
var hs=t.tHead.rows[0].cells;
for(var i=0;i<hs.length;i++){(function(c){hs[c].addEventListener('click',function(){
var d=hs[c].getAttribute('data-desc')!=='1';hs[c].setAttribute('data-desc',d?'1':'0');
sortBy(c,d);});})(i);}
var m=/sort=([a-z_]+)-(asc|desc)/.exec(location.hash);
if(m){for(var j=0;j<hs.length;j++){
if(hs[j].getAttribute('data-key')===m[1]){sortBy(j,m[2]==='desc');}}}
document.body.setAttribute('data-ready','1');})();"""


# ---------------------------------------------------------------------------- pages
class _FeatureData:
    def __init__(self, col: Collected) -> None:
        order = np.argsort(col.feat, kind="stable")
        self.col = col
        self.seq, self.pos = col.seq[order], col.pos[order]
        self.val, feat = col.val[order], col.feat[order]
        self.start = np.searchsorted(feat, np.arange(col.d_sae + 1))

    def of(self, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.start[f], self.start[f + 1]
        return self.seq[a:b], self.pos[a:b], self.val[a:b]


def _context_html(
    col: Collected, lookup: dict[tuple[int, int], float], s: int, p: int, ctx: int, vmax: float
) -> str:
    toks = col.tokens[s]
    lo, hi = max(0, p - ctx), min(len(toks), p + ctx + 1)
    spans = []
    for q in range(lo, hi):
        v = lookup.get((s, q), 0.0)
        cls = " class='c'" if q == p else ""
        spans.append(f"<span{cls} style='{_colour(v, vmax)}' title='{v:.4g}'>{esc(toks[q])}</span>")
    v0 = lookup.get((s, p), 0.0)
    return f"<div class='ctx'><span class='v'>{v0:+.3f}</span>{''.join(spans)}</div>"


def _feature_page(
    f: int,
    fd: _FeatureData,
    cfg: DashboardConfig,
    rendered: set[int],
    neighbours: list[tuple[int, float]],
    logits: tuple[list[tuple[str, float]], list[tuple[str, float]]] | None,
    meta: dict[str, Any],
    rng: np.random.Generator,
) -> str:
    col = fd.col
    seq, pos, val = fd.of(f)
    density = len(val) / col.n_tokens
    vmax = float(np.abs(val).max()) if len(val) else 0.0
    lookup = {(int(s), int(p)): float(v) for s, p, v in zip(seq, pos, val)}
    out = [
        f"<p><a href='../index.html'>index</a></p><h1>Feature {f}</h1>",
        f"<p>{esc(meta.get('site', ''))} · density {density:.4g} ({len(val)} of"
        f" {col.n_tokens} tokens) · max |act| {vmax:.4g}"
        + (f" · mean act {float(val.mean()):.4g}" if len(val) else "")
        + "</p>",
        svg_histogram(val, cfg.bins, f"DENSITY = {density:.4g}"),
    ]
    if len(val) == 0:
        out.append("<p class='muted'>this feature never fired on the collected tokens</p>")
    else:
        signed = bool((val < 0).any())
        groups = [("Top activations", np.argsort(-np.abs(val), kind="stable")[: cfg.n_top])]
        if signed:
            groups = [
                ("Top positive activations", np.argsort(-val, kind="stable")[: cfg.n_top]),
                ("Top negative activations", np.argsort(val, kind="stable")[: cfg.n_top]),
            ]
        for title, idx in groups:
            out.append(f"<h2>{title}</h2>")
            out.extend(
                _context_html(col, lookup, int(seq[i]), int(pos[i]), cfg.context, vmax)
                for i in idx
                if title != "Top negative activations" or val[i] < 0
            )
        out.append("<h2>Quantile samples</h2>")
        order = np.argsort(np.abs(val), kind="stable")
        for q, chunk in reversed(list(enumerate(np.array_split(order, cfg.n_quantiles)))):
            if len(chunk) == 0:
                continue
            lo, hi = float(np.abs(val[chunk]).min()), float(np.abs(val[chunk]).max())
            pick = rng.choice(chunk, size=min(cfg.per_quantile, len(chunk)), replace=False)
            out.append(f"<h3>Quantile {q + 1}/{cfg.n_quantiles}: |act| {lo:.3g} – {hi:.3g}</h3>")
            out.extend(
                _context_html(col, lookup, int(seq[i]), int(pos[i]), cfg.context, vmax)
                for i in pick
            )
    out.append("<h2>Nearest decoder neighbours (cosine)</h2><table>")
    for g, c in neighbours:
        name = f"<a href='{g}.html'>{g}</a>" if g in rendered else str(g)
        out.append(f"<tr><td>{name}</td><td>{c:+.3f}</td></tr>")
    out.append("</table>")
    if logits is not None:
        pos_l, neg_l = logits
        out.append("<h2>Direct logit effect d·W_U</h2><table><tr><th>promoted</th><th></th>")
        out.append("<th>suppressed</th><th></th></tr>")
        for (a, x), (b, y) in zip(pos_l, neg_l):
            out.append(
                f"<tr><td class='ctx'>{esc(a)}</td><td>{x:+.3f}</td>"
                f"<td class='ctx'>{esc(b)}</td><td>{y:+.3f}</td></tr>"
            )
        out.append("</table>")
    return _page(f"Feature {f}", "".join(out))


def _choose(cfg: DashboardConfig, fired: np.ndarray, counts: np.ndarray, d_sae: int) -> list[int]:
    if cfg.feature_ids:
        bad = [f for f in cfg.feature_ids if not 0 <= f < d_sae]
        if bad:
            raise ConfigError(f"feature index out of range 0..{d_sae - 1}: {bad}")
        return list(dict.fromkeys(int(f) for f in cfg.feature_ids))
    if cfg.select == "dense":  # n_features and select are validated by DashboardConfig
        return [int(i) for i in np.argsort(-counts, kind="stable")[: cfg.n_features]]
    pool = np.flatnonzero(fired)
    rng = np.random.default_rng(cfg.seed)
    take = rng.choice(pool, size=min(cfg.n_features, len(pool)), replace=False)
    return sorted(int(i) for i in take)


def build_dashboard(
    sae: SAE,
    col: Collected,
    out_dir: str | Path,
    cfg: DashboardConfig | None = None,
    model: nn.Module | None = None,
    tok: Any = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the static site for ``col`` to ``out_dir``; returns the index path."""
    cfg = cfg or DashboardConfig()
    meta = dict(meta or {})
    out = Path(out_dir)
    (out / "features").mkdir(parents=True, exist_ok=True)
    counts = np.bincount(col.feat, minlength=col.d_sae)
    feats = _choose(cfg, counts > 0, counts, col.d_sae)
    rendered = set(feats)
    fd = _FeatureData(col)

    W = decoder_directions(sae).float()
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    W_U = unembedding(model) if model is not None else None
    if W_U is not None and W_U.shape[1] != W.shape[1]:
        W_U = None  # the site's width differs from the LM head's
    rng = np.random.default_rng(cfg.seed)
    rows, np_records = [], []
    for f in feats:
        cos = (Wn @ Wn[f]).numpy()
        cos[f] = -np.inf
        nb = [(int(g), float(cos[g])) for g in np.argsort(-cos)[: cfg.n_neighbours]]
        logits, eff = None, None
        if W_U is not None and tok is not None:
            eff = (W_U.float() @ W[f]).numpy()
            top, bot = np.argsort(-eff)[: cfg.n_logits], np.argsort(eff)[: cfg.n_logits]
            logits = (
                [(tok.decode([int(i)]), float(eff[i])) for i in top],
                [(tok.decode([int(i)]), float(eff[i])) for i in bot],
            )
        page = _feature_page(f, fd, cfg, rendered, nb, logits, meta, rng)
        write_text(out / "features" / f"{f}.html", page)
        seq, pos, val = fd.of(f)
        if cfg.neuronpedia:
            from saekit.io.neuronpedia import feature_record

            decode = tok.decode if tok is not None else str
            np_records.append(
                feature_record(f, seq, pos, val, col.tokens, col.n_tokens, W[f].numpy(), eff,
                               decode, cfg, np.random.default_rng(cfg.seed + f))
            )  # fmt: skip
        if len(val):
            i = int(np.argmax(np.abs(val)))
            top_tok, vmax = col.tokens[int(seq[i])][int(pos[i])], float(val[i])
        else:
            top_tok, vmax = "", 0.0
        rows.append((f, len(val) / col.n_tokens, vmax, top_tok))

    rows.sort(key=lambda r: (-r[1], r[0]))  # the index lists features by density, highest first
    fired = counts > 0
    log_d = np.log10(counts[fired] / col.n_tokens)
    n_dead = int((~fired).sum())
    trs = "".join(
        f"<tr><td data-v='{f}'><a href='features/{f}.html'>{f}</a></td>"
        f"<td data-v='{d:.6g}'>{d:.4g}</td>"
        f"<td data-v='{math.log10(d + 1e-10):.4f}'>{math.log10(d + 1e-10):.2f}</td>"
        f"<td data-v='{v:.6g}'>{v:.4g}</td><td class='ctx' data-v='{esc(t)}'>{esc(t)}</td></tr>"
        for f, d, v, t in rows
    )
    info = " · ".join(f"{esc(k)}: {esc(v)}" for k, v in meta.items())
    body = (
        "<h1>SAE feature dashboard</h1>"
        f"<p>{info}</p><p>{col.n_tokens} tokens from {len(col.tokens)} texts · d_sae"
        f" {col.d_sae} · {int(fired.sum())} features fired · {len(feats)} rendered"
        " (click a column header to sort)</p>"
        + svg_histogram(
            log_d, cfg.bins, f"log10 density of fired features ({n_dead} never fired)", True
        )
        + "<table id='feats'><thead><tr><th data-key='feature'>feature</th>"
        "<th data-key='density'>density</th><th data-key='log_density'>log10 density</th>"
        "<th data-key='max'>max act</th><th data-key='top_token'>top token</th></tr></thead>"
        f"<tbody>{trs}</tbody></table>"
    )
    index = out / "index.html"
    write_text(index, _page("SAE feature dashboard", body, _SORT_JS))
    summary = {
        "n_tokens": col.n_tokens,
        "n_texts": len(col.tokens),
        "features": feats,
        "density": {str(f): d for f, d, _, _ in rows},
        **{k: str(v) for k, v in meta.items()},
    }
    write_json(out / "dashboard.json", json_safe(summary))
    if cfg.neuronpedia:
        _write_neuronpedia(out / "neuronpedia", np_records, col, cfg, meta)
    return index


def _write_neuronpedia(
    out: Path, records: list[dict[str, Any]], col: Collected, cfg: DashboardConfig, meta: dict
) -> None:
    from saekit.io.neuronpedia import write_batches
    from saekit.sources.sites import parse_site

    try:
        layer = parse_site(str(meta.get("site", "")))[0]
    except ValueError:
        layer = 0
    prompts = {
        "n_prompts_total": len(col.tokens),
        "n_tokens_in_prompt": max((len(t) for t in col.tokens), default=0),
        "dataset": str(meta.get("data", "")),
    }
    model = str(meta.get("model", "")).split("/")[-1]
    sae_set = str(meta.get("sae_set") or f"saekit-{meta.get('rule', 'sae')}")
    write_batches(out, records, model, layer, sae_set, cfg.features_per_batch, prompts)
