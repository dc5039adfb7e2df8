"""Saving and loading SAEs (SAELens-compatible run directories) and training checkpoints."""

from saekit.io.atomic import atomic_path, load_tensors, read_json, save_tensors, write_json
from saekit.io.native import (
    RunInfo,
    load_density,
    load_sae,
    read_run_config,
    read_run_info,
    save_sae,
)

__all__ = [
    "RunInfo",
    "atomic_path",
    "load_density",
    "load_sae",
    "load_tensors",
    "read_json",
    "read_run_config",
    "read_run_info",
    "save_sae",
    "save_tensors",
    "write_json",
]
