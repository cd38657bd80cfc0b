"""Backend choice, made before JAX initialises any backend.

The Intel GPU plugin registers itself with every `import jax`; where its oneAPI libraries are missing
it logs a long traceback and JAX falls back to the CPU. agx probes the plugin's library first and,
when it cannot load, pins JAX to the CPU with a one-line notice instead.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from pathlib import Path

XPU_PLUGIN = "jax_plugins.intel_extension_for_openxla"


def xpu_plugin_error() -> str | None:
    """Why the installed Intel XPU plugin cannot load here, or None (loads, or not installed)."""
    spec = importlib.util.find_spec(XPU_PLUGIN) if importlib.util.find_spec("jax_plugins") else None
    if spec is None or not spec.submodule_search_locations:
        return None
    for library in Path(spec.submodule_search_locations[0]).glob("*.so"):
        try:
            ctypes.CDLL(str(library))
        except OSError as e:
            return str(e).removeprefix(f"{library}: ")
    return None


def _drop_plugin_chatter(record: logging.LogRecord) -> bool:
    """JAX still imports the plugin and logs its failure in full; that is already said in one line."""
    return XPU_PLUGIN not in record.getMessage() and "Intel Extension for OpenXLA" not in record.getMessage()


def choose_platform() -> None:
    """Pins JAX to the CPU when the XPU plugin is installed but cannot load; JAX_PLATFORMS wins."""
    if os.environ.get("JAX_PLATFORMS"):
        return
    error = xpu_plugin_error()
    if error:
        print(f"agx: Intel XPU plugin cannot load ({error}); running on CPU", file=sys.stderr)
        os.environ["JAX_PLATFORMS"] = "cpu"
        silence_plugin_failure()


def silence_plugin_failure() -> None:
    """For runs pinned to the CPU (the planner's simulated devices): the plugin's failure to load is
    no news there."""
    for name in ("jax._src.xla_bridge", XPU_PLUGIN):
        logging.getLogger(name).addFilter(_drop_plugin_chatter)
