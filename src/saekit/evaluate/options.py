"""What ``saekit eval`` and ``saekit compare`` evaluate and where they write (the inputs of
:func:`~saekit.evaluate.run.evaluate_run` / :func:`~saekit.evaluate.run.compare_runs`; what
they measure is :class:`~saekit.evaluate.run.EvalConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from saekit.config import DataConfig
from saekit.options import Options, fail, option


@dataclass
class EvalTarget(Options):
    """The SAE ``saekit eval`` evaluates, and where its files go."""

    run_dir: str = option(
        help="run directory (cfg.json + sae_weights.safetensors) or a Qwen-Scope .pt",
        positional=True,
    )
    out: str | None = option(None, "output directory (default: RUN_DIR, or FILE.eval/)")
    model: str | None = option(
        None,
        "for SAEs without a saekit data config (Qwen-Scope .pt, SAELens dirs): the HF model"
        " ('' : the built-in MiniLM)",
    )
    site: str | None = option(None, "with --model: the hook site of the SAE")
    dataset: str = option("", "with --model: eval text ('' : the built-in corpus)")
    k: int | None = option(None, "k of a Qwen-Scope file (default: from its L0_<k> name)", ge=1)

    def check(self) -> None:
        if (self.model is None) != (self.site is None):
            given, missing = ("model", "site") if self.site is None else ("site", "model")
            fail(
                "EvalTarget",
                missing,
                None,
                f"is missing: {given} and {missing} go together (the SAE's model and hook site)",
                f"pass --{missing} too",
            )

    def data_config(self) -> DataConfig | None:
        """The DataConfig that ``model`` / ``site`` / ``dataset`` describe (None: the run's)."""
        if self.model is None or self.site is None:
            return None
        return DataConfig(model=self.model, sites=[self.site], dataset=self.dataset)


@dataclass
class CompareOptions(Options):
    """The runs ``saekit compare`` tabulates, and where it writes."""

    run_dirs: list[str] = option(help="run directories", positional=True, nonempty=True)
    out: str = option("compare", "output directory", nonempty=True)
    no_eval: bool = option(False, "fail instead of evaluating runs without eval.json", switch=True)


__all__ = ["CompareOptions", "EvalTarget"]
