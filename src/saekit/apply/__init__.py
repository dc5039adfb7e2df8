"""Applications of a trained SAE: steering, ablation, classifiers, footprints, SASFT, dashboards."""

from saekit.apply.ablate import ablate, ablation_effects
from saekit.apply.classify import classify_texts, fit_classifiers
from saekit.apply.common import load_run, read_texts, site_activations
from saekit.apply.dashboard import DashboardConfig, build_dashboard, collect
from saekit.apply.footprint import coverage_subsample, footprint_report, redundancy_matrix
from saekit.apply.sasft import SASFTRegularizer, SASFTTrainerMixin, sasft_loss
from saekit.apply.steer import generate, steer, steer_compare, top_features
from saekit.sources.hf import load_model  # the one model loader, re-exported

__all__ = [
    "DashboardConfig",
    "SASFTRegularizer",
    "SASFTTrainerMixin",
    "ablate",
    "ablation_effects",
    "build_dashboard",
    "classify_texts",
    "collect",
    "coverage_subsample",
    "fit_classifiers",
    "footprint_report",
    "generate",
    "load_model",
    "load_run",
    "read_texts",
    "redundancy_matrix",
    "sasft_loss",
    "site_activations",
    "steer",
    "steer_compare",
    "top_features",
]
