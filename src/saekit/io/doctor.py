"""``saekit doctor``: check a run or cache directory and say what is wrong.

:func:`diagnose` inspects a run directory (``cfg.json`` and its files, the checkpoint and
what interrupted writes left, ``metrics.jsonl``, the lock; the per-SAE subdirectories of a
sweep too), an activation cache (manifest and every shard) or a compressed model
(``compression.json`` and the files it records), and returns
:class:`Finding` s: ``ok``, ``warn`` (harmless or repaired by the next run) or ``fail``
(the directory cannot be used as it is; the message says what to do). Nothing is changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from saekit.errors import SaekitError
from saekit.io import checkpoint as ckpt
from saekit.io import metrics_log
from saekit.io.atomic import stale_temps
from saekit.io.integrity import check_seal, verify_file
from saekit.io.lock import RUN_LOCK, lock_holder


@dataclass
class Finding:
    """One line of the diagnosis."""

    level: str  # "ok", "warn" or "fail"
    what: str  # the file or directory concerned
    message: str

    def __str__(self) -> str:
        return f"{self.level:<4}  {self.what}: {self.message}"


def _try(findings: list[Finding], what: str, fn, ok: str) -> object | None:
    try:
        out = fn()
    except (SaekitError, OSError) as e:
        findings.append(Finding("fail", what, str(e)))
        return None
    findings.append(Finding("ok", what, ok))
    return out


def _lock(findings: list[Finding], lock_file: Path, what: str) -> None:
    holder = lock_holder(lock_file)
    if holder is not None:
        findings.append(
            Finding("warn", what, f"in use by pid {holder.get('pid', '?')} (being written now)")
        )


def _final_files(findings: list[Finding], run: Path, verify: bool) -> dict | None:
    from saekit.io.native import CFG_FILE, CFG_SEAL, load_sae, read_run_config

    start = len(findings)
    cfg = _try(findings, str(run / CFG_FILE), lambda: read_run_config(run), "readable")
    if not isinstance(cfg, dict):
        return None
    section = cfg.get("saekit")
    if not isinstance(section, dict):
        findings.append(Finding("warn", str(run / CFG_FILE), "a plain SAELens directory"))
    else:
        if CFG_SEAL[-1] not in section:
            findings.append(Finding("warn", str(run / CFG_FILE), "not sealed (older saekit)"))
        elif verify:
            _try(
                findings,
                str(run / CFG_FILE),
                lambda: check_seal(cfg, run / CFG_FILE, CFG_SEAL),
                "matches its recorded SHA-256",
            )
        files = section.get("files")
        if not isinstance(files, dict):
            findings.append(
                Finding("warn", str(run / CFG_FILE), "records no file digests (older saekit)")
            )
        else:
            for name, rec in files.items():
                _try(
                    findings,
                    str(run / name),
                    lambda n=name, r=rec: verify_file(run / n, r, verify),
                    "matches its recorded SHA-256" if verify else "size matches",
                )
    if not any(f.level == "fail" for f in findings[start:]):
        _try(findings, str(run), lambda: load_sae(run, verify=False), "the SAE loads")
    return section if isinstance(section, dict) else {}


def _checkpoint(findings: list[Finding], out: Path, verify: bool) -> int | None:
    path = out / "checkpoint"
    step = None
    if path.is_dir():
        meta = _try(
            findings,
            str(path),
            lambda: ckpt.read_meta(path, verify),
            "complete, every file matches its SHA-256" if verify else "complete (sizes match)",
        )
        if isinstance(meta, dict):
            step = int(meta["step"])
            total = meta.get("total_steps")
            findings.append(Finding("ok", str(path), f"step {step} of {total}"))
    old = out / ".checkpoint.old"
    if old.is_dir():
        findings.append(
            Finding(
                "warn",
                str(old),
                "left by an interrupted checkpoint swap; the next run"
                " recovers from it or removes it",
            )  # fmt: skip
        )
    for t in ckpt.stale_writes(path):
        try:
            m = ckpt.read_meta(t, verify)
            msg = f"a complete checkpoint (step {m['step']}) left by a kill; the next run uses it"
        except (SaekitError, OSError):
            msg = "an incomplete checkpoint write left by a kill; the next run removes it"
        findings.append(Finding("warn", str(t), msg))
    for d in [out, *(s for s in out.iterdir() if s.is_dir() and not s.name.startswith("."))]:
        for p in stale_temps(d):
            findings.append(
                Finding("warn", str(p), "left by a killed write; the next run removes it")
            )
    if (out / ".checkpoint.corrupt").is_dir():
        findings.append(
            Finding("warn", str(out / ".checkpoint.corrupt"), "an unusable checkpoint set aside")
        )
    if step is None and not path.is_dir() and not old.is_dir():
        findings.append(Finding("warn", str(path), "no checkpoint"))
    return step


def _metrics(findings: list[Finding], out: Path, step: int | None) -> None:
    p = out / metrics_log.FILE
    if not p.is_file():
        return
    rows, bad = metrics_log.read_rows(p)
    if bad:
        findings.append(
            Finding("warn", str(p), f"unreadable line(s) {bad[:5]} (skipped when resuming)")
        )
    steps = [r.get("step") for r in rows if isinstance(r.get("step"), (int, float))]
    beyond = [s for s in steps if step is not None and s > step]
    if beyond:
        findings.append(
            Finding(
                "warn",
                str(p),
                f"{len(beyond)} line(s) after the checkpoint's step {step}"
                " (dropped when the run resumes)",
            )  # fmt: skip
        )
    if not bad and not beyond:
        findings.append(Finding("ok", str(p), f"{len(rows)} rows"))


def _run(out: Path, verify: bool) -> list[Finding]:
    findings: list[Finding] = []
    _lock(findings, out / RUN_LOCK, str(out))
    step = _checkpoint(findings, out, verify)
    subs = sorted(p for p in out.iterdir() if p.is_dir() and (p / "cfg.json").is_file())
    runs = ([out] if (out / "cfg.json").is_file() else []) + subs
    finished = []
    for r in runs:
        section = _final_files(findings, r, verify)
        finished.append(bool(section) and step is not None and section.get("steps") == step)
    if not runs:
        findings.append(Finding("warn", str(out), "no final SAE yet (the run did not finish)"))
    elif all(finished):
        findings.append(Finding("ok", str(out), f"finished at step {step}"))
    _metrics(findings, out, step)
    return findings


def _cache(out: Path, verify: bool) -> list[Finding]:
    from saekit.sources.cache import CacheSource, read_manifest, stale_writes

    findings: list[Finding] = []
    _lock(findings, out.parent / f".{out.name}.lock", str(out))
    man = _try(findings, str(out / "manifest.json"), lambda: read_manifest(out, verify), "valid")
    if isinstance(man, dict):
        _recorded(findings, out, man.get("files"), verify, "shard file(s)")
        _try(findings, str(out), lambda: CacheSource(out, verify=False), "the cache opens")
    for t in stale_writes(out):
        findings.append(Finding("warn", str(t), "left by an interrupted `saekit cache` (delete)"))
    return findings


def _recorded(findings: list[Finding], out: Path, files: object, verify: bool, what: str) -> None:
    """One finding per recorded file that fails its check, or one ``ok`` for all."""
    if not isinstance(files, dict):
        findings.append(Finding("warn", str(out), "records no file digests (older saekit)"))
        return
    bad = 0
    for name, rec in files.items():
        try:
            verify_file(out / name, rec, verify)
        except (SaekitError, OSError) as e:
            bad += 1
            findings.append(Finding("fail", str(out / name), str(e)))
    if not bad:
        how = "SHA-256" if verify else "size"
        findings.append(Finding("ok", str(out), f"{len(files)} {what}, {how} ok"))


def _compressed(out: Path, verify: bool) -> list[Finding]:
    from saekit.compress.io import META, read_meta

    findings: list[Finding] = []
    meta = _try(findings, str(out / META), lambda: read_meta(out, verify), "valid")
    if isinstance(meta, dict):
        _recorded(findings, out, meta.get("files"), verify, "file(s) of the compressed model")
    return findings


def diagnose(path: str | Path, verify: bool = True) -> list[Finding]:
    """The findings for a run directory, a sweep's out_dir, an activation cache or a
    compressed model (``saekit compress``'s output)."""
    p = Path(path)
    if not p.is_dir():
        return [Finding("fail", str(p), "not a directory")]
    if (p / "manifest.json").is_file():
        return _cache(p, verify)
    if (p / "compression.json").is_file():
        return _compressed(p, verify)
    markers = ("cfg.json", "checkpoint", metrics_log.FILE, ".checkpoint.old")
    if (
        any((p / m).exists() for m in markers)
        or any((d / "cfg.json").is_file() for d in p.iterdir() if d.is_dir())
        or ckpt.stale_writes(p / "checkpoint")
    ):
        return _run(p, verify)
    names = ", ".join(sorted(os.listdir(p))[:5]) or "empty"
    return [Finding("fail", str(p), f"neither a saekit run nor a cache ({names})")]


__all__ = ["Finding", "diagnose"]
