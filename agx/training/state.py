"""The train state and where each of its arrays lives.

The state is planned from abstract shapes first (the init traced, nothing allocated), so that its
shardings, its parameter count and any mesh that does not divide it are known before a byte is
placed; then that same traced init runs as one jitted call straight into those shardings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun
from flax import struct
from jax.sharding import Mesh

from agx.config import Config
from agx.models.gpt import GPT
from agx.parallel.zero import ZeroLayouts, check_divisible, replicated, zero_layouts


class TrainState(struct.PyTreeNode):
    step: jax.Array  # steps taken, skipped ones included: the data position and the rng
    bad_steps: jax.Array  # steps skipped for a non-finite loss or gradient norm
    params: Any
    opt_state: Any


@dataclass(frozen=True)
class StatePlan:
    abstract: TrainState  # ShapeDtypeStructs
    shardings: TrainState  # NamedShardings, per ZeRO stage
    grad_shardings: Any  # NamedShardings for a params-shaped gradient tree
    layouts: ZeroLayouts  # the rules behind them; the model constrains its activations by layouts.params
    init: ClosedJaxpr  # rng -> the state's leaves: the model's init, traced once (tracing it costs more than compiling it)

    @property
    def target(self) -> TrainState:
        """ShapeDtypeStructs that carry their shardings: what a checkpoint restores into."""
        return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      self.abstract, self.shardings)

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree_util.tree_leaves(self.abstract.params))


def init_fn(cfg: Config, tx: optax.GradientTransformation):
    """Returns rng -> boxed TrainState (LogicallyPartitioned leaves carry the logical axis names)."""
    model = GPT(cfg.model)  # no layout: init needs no sharding constraints

    def init(rng):
        tokens_1xT = jnp.zeros((1, cfg.model.seq_len), jnp.int32)
        params = model.init(rng, tokens_1xT)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), bad_steps=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params))

    return init


def plan_params(cfg: Config, mesh: Mesh):
    """(ShapeDtypeStructs, NamedShardings) of the parameters alone, for loading weights to sample
    from or to export: the training layout of cfg.mesh on `mesh`."""
    boxed = jax.eval_shape(lambda rng: GPT(cfg.model).init(rng, jnp.zeros((1, cfg.model.seq_len), jnp.int32)),
                           jax.random.key(0))["params"]
    shardings = zero_layouts(mesh, cfg.mesh, cfg.model.kv_heads).params.tree_shardings(nn.get_partition_spec(boxed))
    abstract = nn.meta.unbox(boxed)
    check_divisible(abstract, shardings, "parameter")
    return abstract, shardings


def plan_state(cfg: Config, tx: optax.GradientTransformation, mesh: Mesh) -> StatePlan:
    init, boxed = jax.make_jaxpr(init_fn(cfg, tx), return_shape=True)(jax.random.key(0))
    logical = nn.get_partition_spec(boxed)
    layouts = zero_layouts(mesh, cfg.mesh, cfg.model.kv_heads)
    shardings = TrainState(step=replicated(mesh), bad_steps=replicated(mesh),
                           params=layouts.params.tree_shardings(logical.params),
                           opt_state=layouts.opt_state.tree_shardings(logical.opt_state))
    abstract = nn.meta.unbox(boxed)
    check_divisible(abstract.params, shardings.params, "parameter")
    check_divisible(abstract.opt_state, shardings.opt_state, "optimizer state")
    return StatePlan(abstract=abstract, shardings=shardings,
                     grad_shardings=layouts.grads.tree_shardings(logical.params), layouts=layouts, init=init)


def init_state(plan: StatePlan, seed: int) -> TrainState:
    """The planned init, run once on the devices: each array is made in its own sharding."""
    init, state_tree = jaxpr_as_fun(plan.init), jax.tree_util.tree_structure(plan.abstract)
    return jax.jit(lambda rng: jax.tree_util.tree_unflatten(state_tree, init(rng)), out_shardings=plan.shardings)(
        jax.random.key(seed))
