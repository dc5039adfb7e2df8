"""Pretrained SAEs from the Hugging Face hub and SAELens's registry.

Spellings accepted wherever saekit takes a run directory:

- ``hf://ORG/REPO/SUBPATH`` (``hf://ORG/REPO@REVISION/SUBPATH``): the files under
  ``SUBPATH`` (a folder or one file) of a hub model repository, fetched with
  ``huggingface_hub.snapshot_download`` into its cache (``HF_HOME`` / ``HF_HUB_CACHE``),
  so ``HF_HUB_OFFLINE=1`` reads a cached copy without the network;
- ``saelens:RELEASE/SAE_ID``: looked up in SAELens's ``pretrained_saes.yaml`` (the file of
  the installed ``sae_lens`` package, read without importing it) to a repo and a path, then
  fetched as above. The registry's ``conversion_func``, model and ``norm_scaling_factor``
  travel along as hints for the format reader.
- anything else: a local path, returned unchanged.

The format is then detected from the files (:mod:`saekit.io.formats`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saekit.errors import ConfigError, EnvironmentProblem, FormatError

HF_PREFIX = "hf://"
SAELENS_PREFIX = "saelens:"

#: SAELens conversion functions whose files saekit detects itself, and the format
CONVERSION_FORMATS = {
    "gemma_2": "gemmascope",
    "gemma_3": "gemmascope",
    "llama_scope": "llamascope",
    "dictionary_learning_1": "dictionary_learning",
    "goodfire": "torch",
    "qwen_scope": "torch",
    "sparsify": "sparsify",
    "deepseek_r1": "torch",
    "llama_scope_r1_distill": "llamascope_r1",
}


@dataclass
class Resolved:
    """A local path and what the spec said about it."""

    path: Path
    spec: str
    hints: dict[str, Any] = field(default_factory=dict)


def is_remote(spec: str | os.PathLike) -> bool:
    s = str(spec)
    return s.startswith((HF_PREFIX, SAELENS_PREFIX))


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """``hf://ORG/REPO[@REV]/SUBPATH`` -> ``(repo_id, revision, subpath)``."""
    rest = spec[len(HF_PREFIX) :].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ConfigError(f"{spec!r}: expected hf://ORG/REPO[@REVISION][/SUBPATH]")
    org, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    return f"{org}/{repo}", revision, "/".join(parts[2:])


def fetch(repo_id: str, subpath: str = "", revision: str | None = None) -> Path:
    """The local copy of ``subpath`` of a hub repo (downloaded unless cached / offline)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise EnvironmentProblem("huggingface_hub is needed for hf:// paths") from e
    patterns = [subpath, f"{subpath}/*"] if subpath else None
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else str(e)
        raise FormatError(f"hf://{repo_id}/{subpath}: cannot fetch ({why})") from e
    except Exception as e:  # network errors, unknown repos, gated repos
        raise FormatError(f"hf://{repo_id}/{subpath}: cannot fetch: {e}") from e
    path = root / subpath if subpath else root
    if not path.exists():
        raise FormatError(f"hf://{repo_id}: no {subpath!r} in the repository (looked in {root})")
    return path


def registry_file() -> Path:
    """SAELens's ``pretrained_saes.yaml`` (EnvironmentProblem when sae_lens is absent)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise EnvironmentProblem(
            "saelens: paths use SAELens's registry; install sae-lens (pip install sae-lens)"
            " or give the hub path as hf://ORG/REPO/SUBPATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"
    if not path.is_file():
        raise EnvironmentProblem(f"the installed sae_lens has no registry file {path}")
    return path


def registry_entry(release: str, sae_id: str, path: Path | None = None) -> dict[str, Any]:
    """``{"repo_id", "path", "conversion_func", "model", ...}`` of one registry SAE."""
    import yaml

    path = path or registry_file()
    with open(path, encoding="utf-8") as fh:
        data = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if release not in data:
        near = sorted(r for r in data if release.split("-")[0] in r)[:8]
        raise ConfigError(
            f"saelens:{release}/{sae_id}: no release {release!r} in {path}"
            + (f"; similar: {', '.join(near)}" if near else "")
        )
    rel = data[release]
    for sae in rel.get("saes", []):
        if sae.get("id") == sae_id:
            out = {k: v for k, v in sae.items() if k != "id"}
            out.update(
                repo_id=rel["repo_id"],
                conversion_func=rel.get("conversion_func"),
                model=rel.get("model"),
                links=rel.get("links") or {},
                release=release,
                sae_id=sae_id,
            )
            return out
    ids = [s.get("id") for s in rel.get("saes", [])]
    raise ConfigError(
        f"saelens:{release}/{sae_id}: no SAE {sae_id!r} in release {release!r};"
        f" ids are {', '.join(map(str, ids[:8]))}{', ...' if len(ids) > 8 else ''}"
    )


def _hf_model_id(entry: dict[str, Any]) -> str | None:
    """The Hugging Face id of a registry release's model: its ``links.model`` hub URL when it
    has one (SAELens's ``model`` is often a TransformerLens name such as ``gpt2-small``)."""
    link = (entry.get("links") or {}).get("model") if isinstance(entry.get("links"), dict) else None
    prefix = "https://huggingface.co/"
    if isinstance(link, str) and link.startswith(prefix):
        return link[len(prefix) :].strip("/")
    return entry.get("model")


def resolve(spec: str | os.PathLike) -> Resolved:
    """A local path for ``spec`` (see the module doc) and the hints it carries."""
    s = str(spec)
    if s.startswith(HF_PREFIX):
        repo, rev, sub = parse_hf(s)
        return Resolved(fetch(repo, sub, rev), s, {"repo_id": repo})
    if s.startswith(SAELENS_PREFIX):
        rest = s[len(SAELENS_PREFIX) :]
        if "/" not in rest:
            raise ConfigError(f"{s!r}: expected saelens:RELEASE/SAE_ID")
        release, sae_id = rest.split("/", 1)
        entry = registry_entry(release, sae_id)
        hints: dict[str, Any] = {"repo_id": entry["repo_id"], "registry": entry}
        model = _hf_model_id(entry)
        if model:
            hints["model"] = model
        if entry.get("norm_scaling_factor"):
            hints["norm_scaling_factor"] = entry["norm_scaling_factor"]
        fmt = CONVERSION_FORMATS.get(str(entry.get("conversion_func")))
        if fmt:
            hints["format"] = fmt
        return Resolved(fetch(entry["repo_id"], str(entry["path"])), s, hints)
    return Resolved(Path(s), s, {})


__all__ = ["Resolved", "fetch", "is_remote", "parse_hf", "registry_entry", "resolve"]
