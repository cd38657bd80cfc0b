"""Where the two dependency stacks differ (jax 0.5.0 for Intel's plugin, and the newest): import
from here what needs smoothing over. Keep it tiny."""

import logging


def _drop_grain_profiler_notice(record: logging.LogRecord) -> bool:
    """Grain's optional profiler does not load with jaxlib 0.5 (the xpu stack) and says so at import."""
    return "jax profiler" not in record.getMessage() and "worker profiling" not in record.getMessage()


logging.getLogger("absl").addFilter(_drop_grain_profiler_notice)
import grain  # noqa: E402

__all__ = ["grain", "shard_map"]

import jax  # noqa: E402

if hasattr(jax, "shard_map"):  # the newest stack
    def shard_map(f, mesh, in_specs, out_specs, checked=True):
        """checked=False where JAX never transposes it (both ways of a custom_vjp written out): its
        check refuses some under nested vmaps with spmd_axis_name (1F1B's inside a data replica's)."""
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=checked)
else:  # jax 0.5.0, whose replication check refuses some correct programs (an index computed from
    # axis_index against the batch's). Unchecked, its transpose sums the inputs' gradients over the
    # axes their specs leave out: correct, at worst one reduction more.
    from jax.experimental.shard_map import shard_map as _experimental_shard_map

    def shard_map(f, mesh, in_specs, out_specs, checked=True):
        return _experimental_shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
