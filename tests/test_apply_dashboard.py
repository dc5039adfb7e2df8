"""Static dashboards: content, escaping, and rendering in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.apply.dashboard import (
    Collected,
    DashboardConfig,
    build_dashboard,
    collect,
    esc,
    svg_histogram,
)
from saekit.apply.toy import tiny_gpt2, word_tokenizer

SCRIPT = "<script>window.__pwned=1;document.title='pwned'</script>"
IMG = "<img src=x onerror=\"document.title='img'\">"
SITE = "layers.1.resid_post"


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    exe = _find_chromium()
    if exe is None:
        pytest.skip(
            "no chromium on PATH: `make test` installs it where root and apt-get allow"
            " (make test-deps), else these browser checks are skipped"
        )
    return exe


def run_chromium(exe: str, tmp: Path, url: str, *extra: str) -> str:
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp / 'chrome-profile'}",
        *extra,
        url,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return res.stdout


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    texts = [
        f"the cat sat on the mat {SCRIPT} and ran",
        f"a dog {IMG} ran far away",
        "the cat and the dog sat",
    ] * 3
    tok = word_tokenizer(texts, 64, extra_tokens=(SCRIPT, IMG))
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=0)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=4)).eval()
    col = collect(sae, model, tok, SITE, texts)
    # the features firing on the injected tokens
    on_script, on_img = set(), set()
    for s, p, f in zip(col.seq, col.pos, col.feat):
        tok_s = col.tokens[s][p].strip()
        (on_script if tok_s == SCRIPT else on_img if tok_s == IMG else set()).add(int(f))
    assert on_script and on_img
    feats = sorted(on_script)[:3] + sorted(on_img - on_script)[:3]
    out = tmp_path_factory.mktemp("dash")
    cfg = DashboardConfig(feature_ids=feats, n_top=5, n_quantiles=3, per_quantile=2)
    index = build_dashboard(sae, col, out, cfg, model, tok, {"site": SITE, "model": IMG})
    return out, index, feats, col, feats[0]


def test_pages_have_the_expected_content(site_dir):
    out, index, feats, col, _ = site_dir
    html = index.read_text()
    for f in feats:
        assert f"features/{f}.html" in html
        page = (out / "features" / f"{f}.html").read_text()
        for section in ("Top activations", "Quantile", "Nearest decoder neighbours", "d·W_U"):
            assert section in page
        assert "DENSITY = " in page and "<svg" in page
    # every raw injected string appears only escaped
    for p in [index, *(out / "features").glob("*.html")]:
        text = p.read_text()
        assert SCRIPT not in text and IMG not in text
        assert "<script" not in text or p == index
    assert html.count("<script") == 1  # the sorting script only
    assert esc(IMG) in html  # the meta line (model name) is escaped too


def test_injected_tokens_render_as_text_and_do_not_run(site_dir, chromium, tmp_path):
    out, index, feats, _, f = site_dir  # f fires on the injected script token
    page = out / "features" / f"{f}.html"
    dom = run_chromium(chromium, tmp_path, page.as_uri(), "--dump-dom")
    assert f"<title>Feature {f}</title>" in dom  # the injected script did not run
    assert "pwned</title>" not in dom and "img</title>" not in dom
    assert "&lt;script&gt;window.__pwned=1;document.title='pwned'&lt;/script&gt;" in dom
    assert not re.search(r"<script[\s>]", dom)  # no script element was created
    assert not re.search(r"<img[\s>]", dom)  # nor an img element
    assert "Top activations" in dom and "Nearest decoder neighbours" in dom
    shot = tmp_path / "feature.png"
    run_chromium(
        chromium, tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1000,900"
    )
    assert shot.is_file() and shot.stat().st_size > 5000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_index_sorts_with_its_inline_script(site_dir, chromium, tmp_path):
    out, index, feats, col, _ = site_dir
    dom = run_chromium(chromium, tmp_path, index.as_uri() + "#sort=density-desc", "--dump-dom")
    assert 'data-ready="1"' in dom  # the hashed inline script ran under the CSP
    assert 'data-sorted="1-desc"' in dom
    body = dom[dom.index("<tbody>") : dom.index("</tbody>")]
    dens = [float(x) for x in re.findall(r'<td data-v="([-0-9.e]+)">[^<]*</td><td data-v="-', body)]
    assert len(dens) == len(feats)
    assert dens == sorted(dens, reverse=True)
    assert "<title>SAE feature dashboard</title>" in dom


def test_signed_codes_and_helpers(tmp_path):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=6, k=2))
    col = Collected(
        tokens=[["a", " <b>", " c"], ["d", " e"]],
        seq=np.array([0, 0, 1, 1]),
        pos=np.array([0, 1, 0, 1]),
        feat=np.array([2, 2, 2, 4]),
        val=np.array([1.5, -2.0, 0.5, 1.0], dtype=np.float32),
        n_tokens=5,
        d_sae=6,
    )
    index = build_dashboard(sae, col, tmp_path, DashboardConfig(n_features=3))
    page = (tmp_path / "features" / "2.html").read_text()
    assert "Top positive activations" in page and "Top negative activations" in page
    assert "rgba(0,110,255" in page and "rgba(255,80,0" in page  # both signs coloured
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "density 0.6" in page
    html = index.read_text()
    assert "features/2.html" in html and "features/4.html" in html
    assert "features/0.html" not in html  # random choice is among fired features
    assert esc("<x a='1'>\n") == "&lt;x a=&#x27;1&#x27;&gt;↵"
    assert svg_histogram(np.array([]), 5, "t").startswith("<p")
    with pytest.raises(ValueError, match="out of range"):
        build_dashboard(sae, col, tmp_path, DashboardConfig(feature_ids=[9]))
