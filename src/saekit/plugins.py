"""User extensions: modules imported before use, so that their ``@register``-ed rules (and
aux losses, named inputs) exist.

A rule written outside saekit is a ``Rule`` subclass with ``@register`` in any module; it
trains, saves, loads, exports and is listed by ``saekit rules`` once that module has been
imported. Three ways to import it, all equivalent:

* ``saekit --plugin MODULE COMMAND ...`` (repeatable; ``MODULE`` is a dotted module name
  on ``sys.path`` or a path to a ``.py`` file);
* the environment variable ``SAEKIT_PLUGINS`` (comma-separated, same forms);
* an installed package's entry point in the group ``saekit.plugins`` (its value is the module).

:func:`load_plugins` imports each once. The registries call it when asked for a name they
do not know, so library code (``load_sae``, ``SAE(cfg)``) sees environment and entry-point
plugins too. saekit never imports a module named inside a saved file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from saekit.errors import ConfigError

ENV_VAR = "SAEKIT_PLUGINS"
ENTRY_POINT_GROUP = "saekit.plugins"

_loaded: dict[str, ModuleType] = {}
_auto_done = False


def import_plugin(spec: str, where: str = "--plugin") -> ModuleType:
    """Import one plugin: a dotted module name or a ``.py`` file path (``where``: for errors)."""
    spec = spec.strip()
    if spec in _loaded:
        return _loaded[spec]
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        mod = _import_file(Path(spec), where)
    else:
        try:
            mod = importlib.import_module(spec)
        except ModuleNotFoundError as e:
            if e.name is None or not spec.startswith(e.name):
                raise  # the plugin itself imports something missing: its traceback helps
            raise ConfigError(
                f"{where} {spec}: no module named {e.name!r}; put it on PYTHONPATH or give"
                " the path of its .py file"
            ) from None
    _loaded[spec] = mod
    return mod


def _import_file(path: Path, where: str) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"{where} {path}: file not found")
    name = f"saekit_plugin_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where} {path}: not an importable Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def env_plugins() -> list[str]:
    """The plugin specs in ``SAEKIT_PLUGINS``."""
    return [s.strip() for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]


def load_plugins(specs: Iterable[str] = ()) -> list[str]:
    """Import ``specs``, then (once per process) ``SAEKIT_PLUGINS`` and the entry points.

    Returns the specs imported by this call. Safe to call repeatedly.
    """
    global _auto_done
    done = [s for s in specs if s.strip() not in _loaded]
    for s in done:
        import_plugin(s)
    if not _auto_done:
        _auto_done = True
        for s in env_plugins():
            if s not in _loaded:
                import_plugin(s, where=ENV_VAR)
                done.append(s)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.value not in _loaded:
                _loaded[ep.value] = ep.load()
                done.append(ep.value)
    return done


T = TypeVar("T")


def registered(registry: Mapping[str, T], name: str) -> T | None:
    """``registry[name]``, importing the plugins first on a miss; None when still absent."""
    if name not in registry:
        load_plugins()
    return registry.get(name)


def registered_names(registry: Mapping[str, object]) -> list[str]:
    """The names in ``registry`` once the plugins are imported, sorted."""
    load_plugins()
    return sorted(registry)


__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "env_plugins", "import_plugin", "load_plugins"]
