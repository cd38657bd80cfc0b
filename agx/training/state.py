"""The train state and where each of its arrays lives.

The state is planned from abstract shapes first (the init traced, nothing allocated), so that its
shardings, its parameter count and any mesh that does not divide it are known before a byte is
placed; then that same traced init runs as one jitted call straight into those shardings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun
from flax import struct
from jax.sharding import Mesh

from agx.config import Config, ModelConfig
from agx.errors import UserError
from agx.models.gpt import GPT
from agx.parallel.padding import pad_to, stored_shapes, unpad_to
from agx.parallel.zero import ZeroLayouts, mesh_specs, replicated, zero_layouts
from agx.training.optimizer import AdamW


class TrainState(struct.PyTreeNode):
    step: jax.Array  # steps taken, skipped ones included: the data position and the rng
    bad_steps: jax.Array  # steps skipped for a non-finite loss or gradient norm
    params: Any
    opt_state: Any


@dataclass(frozen=True)
class StatePlan:
    abstract: TrainState  # ShapeDtypeStructs, as stored: padded where the mesh does not divide (agx.parallel.padding)
    logical: TrainState  # ShapeDtypeStructs, as the model and the optimizer see them
    shardings: TrainState  # NamedShardings, per ZeRO stage
    grad_shardings: Any  # NamedShardings for a params-shaped gradient tree (stored shapes), as accumulated
    update_shardings: Any  # and as reduced for the optimizer: its state's layout (ZeRO-1 shards it over data)
    layouts: ZeroLayouts  # the rules behind them; the model constrains its activations by layouts.params
    init: ClosedJaxpr  # rng -> the state's leaves: the model's init, traced once (tracing it costs more than compiling it)

    @property
    def padded(self) -> bool:
        shapes = lambda tree: [x.shape for x in jax.tree_util.tree_leaves(tree)]
        return shapes(self.abstract) != shapes(self.logical)

    def pad(self, state: TrainState) -> TrainState:
        """A state at the logical shapes, padded with zeros to the stored ones."""
        return jax.tree_util.tree_map(lambda x, a: pad_to(x, a.shape), state, self.abstract)

    def unpad_params(self, params):
        """The model's parameters cut from the stored ones: inside a jitted step, where a shard may be uneven."""
        return jax.tree_util.tree_map(lambda x, a: unpad_to(x, a.shape), params, self.logical.params)

    @property
    def target(self) -> TrainState:
        """ShapeDtypeStructs that carry their shardings: what a checkpoint restores into."""
        return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      self.abstract, self.shardings)

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree_util.tree_leaves(self.logical.params))


def _shapes_only(m: ModelConfig) -> ModelConfig:
    """Init runs the model once for its weights alone: agx's dense attention, on any machine, stands in
    for the one chosen (cuDNN's would need an NVIDIA GPU to trace even for the planner's shapes)."""
    return dataclasses.replace(m, attention="xla", attention_block=0)


def init_fn(cfg: Config, tx: AdamW):
    """Returns rng -> boxed TrainState (LogicallyPartitioned leaves carry the logical axis names)."""
    model = GPT(_shapes_only(cfg.model))  # no layout: init needs no sharding constraints

    def init(rng):
        tokens_1xT = jnp.zeros((1, cfg.model.seq_len), jnp.int32)
        params = model.init(rng, tokens_1xT)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), bad_steps=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params))

    return init


def plan_params(cfg: Config, mesh: Mesh):
    """(ShapeDtypeStructs, NamedShardings) of the parameters alone, for loading weights to sample
    from or to export: the training layout of cfg.mesh on `mesh`, which must divide them (these
    arrays go to the model as they are, unpadded)."""
    boxed = jax.eval_shape(lambda rng: GPT(_shapes_only(cfg.model)).init(rng, jnp.zeros((1, cfg.model.seq_len), jnp.int32)),
                           jax.random.key(0))["params"]
    shardings = zero_layouts(mesh, cfg.mesh, cfg.model.kv_heads).params.tree_shardings(nn.get_partition_spec(boxed))
    abstract = nn.meta.unbox(boxed)
    stored = stored_shapes(abstract, [mesh_specs(shardings)], mesh.shape, "parameter")
    for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree_util.tree_leaves(stored)):
        if a.shape != s.shape:
            raise UserError(f"mesh {dict(mesh.shape)} does not divide parameter {jax.tree_util.keystr(path)} "
                            f"{a.shape}: choose --set mesh sizes that divide it (padding is for training only)")
    return abstract, shardings


def plan_state(cfg: Config, tx: AdamW, mesh: Mesh) -> StatePlan:
    init, boxed = jax.make_jaxpr(init_fn(cfg, tx), return_shape=True)(jax.random.key(0))
    axes = nn.get_partition_spec(boxed)
    layouts = zero_layouts(mesh, cfg.mesh, cfg.model.kv_heads)
    shardings = TrainState(step=replicated(mesh), bad_steps=replicated(mesh),
                           params=layouts.params.tree_shardings(axes.params),
                           opt_state=layouts.opt_state.tree_shardings(axes.opt_state))
    logical = nn.meta.unbox(boxed)
    # One stored shape for a weight, its gradient and its moments: padded for every layout of the three.
    every_layout = lambda tree: [mesh_specs(layout.tree_shardings(tree)) for layout in layouts.all]
    abstract = logical.replace(params=stored_shapes(logical.params, every_layout(axes.params), mesh.shape, "parameter"),
                               opt_state=stored_shapes(logical.opt_state, every_layout(axes.opt_state), mesh.shape,
                                                       "optimizer state"))
    return StatePlan(abstract=abstract, logical=logical, shardings=shardings,
                     grad_shardings=layouts.grads.tree_shardings(axes.params),
                     update_shardings=layouts.opt_state.tree_shardings(axes.params), layouts=layouts, init=init)


def init_state(plan: StatePlan, seed: int) -> TrainState:
    """The planned init, run once on the devices: each array is made in its own sharding."""
    init, state_tree = jaxpr_as_fun(plan.init), jax.tree_util.tree_structure(plan.abstract)
    return jax.jit(lambda rng: plan.pad(jax.tree_util.tree_unflatten(state_tree, init(rng))),
                   out_shardings=plan.shardings)(
        jax.random.key(seed))
