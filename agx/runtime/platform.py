"""Backend choice, made before JAX initialises any backend: `runtime.platform=auto|xpu|cuda|cpu`.

The Intel GPU plugin (intel-extension-for-openxla) registers itself with every `import jax`, as the
backend `sycl`; where its oneAPI libraries are missing it logs a long traceback and JAX falls back to
the CPU. agx probes the plugin's libraries first, so that `auto` can leave it out with a one-line
notice, and `xpu` can refuse in one line saying why.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from pathlib import Path

from agx.errors import UserError

XPU_PLUGIN = "jax_plugins.intel_extension_for_openxla"
# What JAX_PLATFORMS names each platform: the Intel plugin registers its backend as `sycl`.
JAX_PLATFORM_NAMES = {"xpu": "sycl", "cuda": "cuda", "cpu": "cpu"}


def _xpu_plugin_dir() -> Path | None:
    spec = importlib.util.find_spec(XPU_PLUGIN) if importlib.util.find_spec("jax_plugins") else None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def xpu_plugin_error() -> str | None:
    """Why the installed Intel XPU plugin cannot load here, or None (loads, or not installed)."""
    plugin = _xpu_plugin_dir()
    for library in plugin.glob("*.so") if plugin else ():
        try:
            ctypes.CDLL(str(library))
        except OSError as e:
            return str(e).removeprefix(f"{library}: ")
    return None


def _drop_plugin_chatter(record: logging.LogRecord) -> bool:
    """JAX still imports the plugin and logs its failure in full; that is already said in one line."""
    return XPU_PLUGIN not in record.getMessage() and "Intel Extension for OpenXLA" not in record.getMessage()


def choose_platform(platform: str = "auto") -> None:
    """Sets JAX_PLATFORMS for `platform`. For `auto` an explicit JAX_PLATFORMS wins, and the XPU
    plugin is left out (the CPU is pinned) when it is installed but cannot load."""
    if platform == "auto":
        if os.environ.get("JAX_PLATFORMS"):
            return
        error = xpu_plugin_error()
        if error:
            print(f"agx: Intel XPU plugin cannot load ({error}); running on CPU", file=sys.stderr)
            os.environ["JAX_PLATFORMS"] = "cpu"
            silence_plugin_failure()
        return
    if platform == "xpu":
        if _xpu_plugin_dir() is None:
            raise UserError("runtime.platform=xpu: the Intel XPU plugin is not installed "
                            "(pip install -e '.[xpu]' installs intel-extension-for-openxla)")
        error = xpu_plugin_error()
        if error:
            raise UserError(f"runtime.platform=xpu: the Intel XPU plugin cannot load ({error}); "
                            "load the oneAPI runtime first (on Aurora: module load frameworks)")
        os.environ.setdefault("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")  # each tile a device (Aurora: 12 a node)
    else:
        silence_plugin_failure()
    if platform == "cuda" and not _cuda_plugin_installed():
        raise UserError("runtime.platform=cuda: JAX's CUDA plugin is not installed (pip install 'jax[cuda12]')")
    os.environ["JAX_PLATFORMS"] = JAX_PLATFORM_NAMES[platform]


def _cuda_plugin_installed() -> bool:
    """jax[cudaNN] installs the plugin as jax_plugins.xla_cudaNN (jax_cudaNN_plugin holds its kernels)."""
    import pkgutil

    plugins = importlib.util.find_spec("jax_plugins")
    return bool(plugins) and any(m.name.startswith("xla_cuda") for m in pkgutil.iter_modules(plugins.submodule_search_locations))


def started_platform(platform: str) -> str:
    """Starts JAX's backend and returns the platform it runs on; a backend that cannot start is one
    line, not JAX's traceback."""
    import jax

    try:
        return jax.devices()[0].platform
    except Exception as e:  # noqa: BLE001 - RuntimeError, or an assertion inside JAX when nothing starts
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"runtime.platform={platform}: JAX cannot start it ({reason})") from None


def silence_plugin_failure() -> None:
    """For runs pinned to another platform: the plugin's failure to load is no news there."""
    for name in ("jax._src.xla_bridge", XPU_PLUGIN):
        logging.getLogger(name).addFilter(_drop_plugin_chatter)
