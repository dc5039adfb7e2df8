"""Architecture parts (Matryoshka, Gated, transcoders, crosscoders), registered by name; see
:mod:`saekit.arch.base`. Importing this package imports (and so registers) every module in
it: a new part is one file here, or one module of your own imported first
(:mod:`saekit.plugins`)."""

import importlib
import pkgutil

from saekit.arch.base import (
    STAGES,
    ArchImport,
    ArchPart,
    ArchStack,
    SAELensImport,
    arch_from_saelens,
    arch_names,
    arch_sites,
    gather,
    get_arch_class,
    input_site,
    needed_sites,
    parse_arch,
    plan_sites,
    register_arch,
    site_inputs_of,
    views,
    widths,
)

ARCH_MODULES = [
    m.name
    for m in pkgutil.iter_modules(__path__)
    if m.name != "base" and not m.name.startswith("_")
]
for _name in ARCH_MODULES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = [
    "ARCH_MODULES",
    "STAGES",
    "ArchImport",
    "ArchPart",
    "ArchStack",
    "SAELensImport",
    "arch_from_saelens",
    "arch_names",
    "arch_sites",
    "gather",
    "get_arch_class",
    "input_site",
    "site_inputs_of",
    "needed_sites",
    "parse_arch",
    "plan_sites",
    "register_arch",
    "views",
    "widths",
]
