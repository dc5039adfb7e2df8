"""Options of the application commands (``saekit steer | ablate | classify | footprint |
dashboard``), declared once (:mod:`saekit.options`): the flags, their validation and docs.

:class:`RunOptions` says which run, model and hook site (default: the run's own). Each
command adds its inputs (``SteerOptions``, ...); the method options that a library function
takes as keywords live beside it (:class:`~saekit.apply.ablate.AblateConfig`,
:class:`~saekit.apply.classify.ClassifyConfig`,
:class:`~saekit.apply.footprint.FootprintConfig`,
:class:`~saekit.apply.dashboard.DashboardConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

from saekit.config import DTYPES, device_problem
from saekit.options import Options, option


def _site_problem(site: str) -> str | None:
    if not site:
        return None
    from saekit.sources.sites import parse_site

    try:
        parse_site(site)
    except ValueError as e:
        return f"is not a hook site: {e}"
    return None


def _feature_spec_problem(specs: list[str]) -> str | None:
    from saekit.apply.steer import parse_feature_spec

    for s in specs:
        try:
            parse_feature_spec(s)
        except ValueError as e:
            return f"has a {e}"
    return None


@dataclass
class RunOptions(Options):
    """The run an application uses, and the model and hook site (default: the run's)."""

    run_dir: str = option(
        help="run directory with cfg.json + weights", positional=True, metavar="RUN_DIR"
    )
    model: str | None = option(
        None, "HF id or local path (default: the run's model; '' : the MiniLM)"
    )
    site: str = option(
        "", "hook site, e.g. layers.3.resid_post ('' : the run's)", check=_site_problem
    )
    device: str = option("cpu", "torch device", check=device_problem)
    dtype: str = option("float32", "model dtype", choices=DTYPES)
    max_len: int = option(0, "tokens per text (0: the run's context_len)", ge=0)
    as_json: bool = option(False, "print the result as JSON", flag="json", switch=True)


@dataclass
class SteerOptions(Options):
    """What ``saekit steer`` generates from and how it steers."""

    prompt: list[str] = option(help="prompt (repeatable)", repeat=True, nonempty=True)
    feature: list[str] = option(
        [],
        "feature and value, e.g. 12:4.0 or 7:-2 (repeatable)",
        repeat=True,
        metavar="I:V",
        check=_feature_spec_problem,
    )
    mode: str = option(
        "add", "add, clamp or ablate the features", choices=("add", "clamp", "ablate")
    )
    max_new_tokens: int = option(20, "tokens generated per prompt", ge=1)
    top: int = option(0, "also list the N top features per prompt (0: no list)", ge=0)

    def check(self) -> None:
        if not self.feature and not self.top:
            from saekit.options import fail

            fail(
                "SteerOptions",
                "feature",
                self.feature,
                "is empty and top is 0: nothing to do",
                "give at least one --feature I:V (or --top N to list features)",
            )


@dataclass
class AblateOptions(Options):
    """The texts ``saekit ablate`` measures the loss on."""

    text: list[str] = option([], "text (repeatable)", repeat=True)
    data: str = option("", "a .txt / .jsonl file of texts instead")
    text_field: str = option("text", "JSONL field holding the text", nonempty=True)
    limit: int = option(64, "at most this many texts from --data (0: all)", ge=0)


@dataclass
class ClassifyOptions(Options):
    """The labelled texts ``saekit classify`` learns from, and where the result goes."""

    data: str = option(help="JSONL with text and label fields", nonempty=True)
    text_field: str = option("text", "JSONL field holding the text", nonempty=True)
    label_field: str = option("label", "JSONL field holding the label", nonempty=True)
    out: str = option("", "also write the result JSON here")


@dataclass
class FootprintOptions(Options):
    """The datasets ``saekit footprint`` compares, and where the report goes."""

    data: list[str] = option(help="datasets: PATH or NAME=PATH", nonempty=True)
    out: str = option(help="output directory", nonempty=True)
    text_field: str = option("text", "JSONL field holding the text", nonempty=True)
    limit: int = option(0, "at most this many texts per dataset (0: all)", ge=0)


@dataclass
class DashboardOptions(Options):
    """The texts ``saekit dashboard`` collects activations from, and where it writes."""

    out: str = option(help="output directory", nonempty=True)
    data: str | None = option(None, "texts (.txt/.jsonl; default: the run's data)")
    text_field: str | None = option(None, "JSONL field holding the text (default: the run's)")
    tokens: int = option(20000, "tokens to collect", ge=1)


__all__ = [
    "AblateOptions",
    "ClassifyOptions",
    "DashboardOptions",
    "FootprintOptions",
    "RunOptions",
    "SteerOptions",
]
