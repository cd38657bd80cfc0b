"""One training step: forward, backward with gradient accumulation, clipping, AdamW. One jitted
function with explicit in/out shardings and the old state donated. A step whose loss or gradient
norm is not finite changes nothing but the step counters (Megatron's skipped iteration)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agx.config import Config
from agx.models import gpt
from agx.models.attention_choice import for_device
from agx.models.gpt import GPT
from agx.models.loss import cross_entropy
from agx.parallel import one_f_one_b, pipeline
from agx.parallel.batch import batch_sharding, row_groups, rows_of_groups, split_microbatches
from agx.parallel.context import check_divides, load_balanced_order, reorder
from agx.parallel.data_parallel import per_replica, reduce_replicas, replica_layout, replica_shardings, replicas
from agx.parallel.mesh import BATCH_AXES, Layout
from agx.parallel.padding import axis_names
from agx.parallel.pipeline import Schedule, plan_schedule
from agx.parallel.weight_gradient import copies_divide, gathered_copies
from agx.parallel.zero import replicated
from agx.training import accumulation
from agx.training.optimizer import AdamW
from agx.training.state import StatePlan, TrainState


def pipeline_schedule(cfg: Config, mesh_shape) -> Schedule | None:
    """cfg's pipeline schedule on a mesh of `mesh_shape`, or None without stages; refuses in one line
    what the pipeline cannot run."""
    return plan_schedule(cfg.pipeline, mesh_shape, cfg.model.num_layers, cfg.model.dropout, cfg.train.batch_size,
                         cfg.train.microbatches)


def loss_function(cfg: Config, layout: Layout, schedule: Schedule | None, train: bool, bubble_value: float = 0.0,
                  stack_shapes=None):
    """(params, tokens_Bx(T+1), rng) -> mean next-token loss; dropout only when training.

    The one place where the model's layers are scheduled: the model's own loop without pipeline
    stages, else its pieces run by the pipeline (GPipe or circular), or by 1F1B when training,
    whose loop computes each micro-batch's loss and gradients at once.
    bubble_value: what idle pipeline stages start from (a test fills them with NaN).
    stack_shapes: the layer stack's shapes, where the step accumulates into its gradient sum (below)."""
    C = layout.sequence_split()
    check_divides(cfg.model.seq_len, C)
    m = for_device(cfg.model, layout.mesh.devices.flat[0], C).applied(cfg.model)  # model.attention=auto chosen
    dropout = train and m.dropout > 0
    positions_T = load_balanced_order(m.seq_len, C) if C > 1 else None  # context parallelism's order
    loss = lambda logits_BxTxV, targets_BxT: cross_entropy(logits_BxTxV, targets_BxT, m.vocab_size)
    stack_logical = gpt.stack_axes(m) if schedule else None  # traced once here, not in every trace of loss_fn

    # the weights outside the layers, where the batch's axes split their gradients and no pipeline runs
    # (or 1F1B's): gathered into one copy a device for the embedding and the head
    # (weight_gradient.gathered_copies), the copies in the batch's order
    copy_axes = tuple(a for a in axis_names(layout.spec(("batch",))[0])
                      if a in axis_names(layout.gradient_spec(("embed",))[0]) and layout.mesh.shape[a] > 1)
    one_f_one_b_loop = train and schedule is not None and schedule.one_f_one_b  # 1F1B: also in its loop
    outside_logical = gpt.outside_axes(m) if copy_axes and (not schedule or one_f_one_b_loop) else None
    G = math.prod(layout.mesh.shape[a] for a in copy_axes)
    inner, S = layout.without(copy_axes), layout.batch_split() // G

    def copies_of(params, axes: tuple):
        """params gathered into one copy a device of `axes` (weight_gradient.gathered_copies)."""
        return jax.tree_util.tree_map(lambda w, logical: gathered_copies(
            w, layout.spec(tuple(logical)), layout.gradient_spec(tuple(logical)), axes, m.dtype, layout.mesh),
            params, outside_logical)

    def loss_fn(params, tokens_BxT1, rng, layer_grad_sum=None):
        """layer_grad_sum: where the step accumulates into the layers' gradient sum in the backward
        (agx.training.accumulation), the sum so far; the layers' gradient then includes it, and
        params['layers'] comes at the sum's stored shapes (padded where the mesh pads it)."""
        tokens_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
        if C > 1:  # each device's positions together: the loss is a mean over all of them, in any order
            in_order = lambda x_BxT: layout.constrain(reorder(x_BxT, C), ("batch", "length"))
            tokens_BxT, targets_BxT = in_order(tokens_BxT), in_order(targets_BxT)
        params = dict(params)
        stack_LxW = params.pop("layers")
        copied = outside_logical is not None and all(
            copies_divide(w.shape, (layout.spec(tuple(logical)), layout.gradient_spec(tuple(logical))), copy_axes,
                          layout.mesh)
            for w, logical in zip(jax.tree_util.tree_leaves(params), _leaves(outside_logical)))
        if schedule is None and layer_grad_sum is None and not copied:
            logits_BxTxV = GPT(m, layout).apply({"params": {**params, "layers": stack_LxW}}, tokens_BxT,
                                                deterministic=not dropout, positions_T=positions_T,
                                                rngs={"dropout": rng} if dropout else None)
            return loss(logits_BxTxV, targets_BxT)
        if one_f_one_b_loop:  # the embedding and the head run inside its loop, on each stage's copy
            layers = gpt.layers_fn(m, layout, not dropout, positions_T)
            P = schedule.stages
            within = inner if copied else layout
            embed, head = gpt.embed_fn(m, within, True, positions_T), gpt.head_fn(m, within)
            if copied:  # a stage's copy: one a device of the batch's axes, each for its own rows
                copies_P = jax.tree_util.tree_map(lambda c: c.reshape(P, G, *c.shape[1:]),
                                                  copies_of(params, ("pipeline", *copy_axes)))
                groups, on_groups = _row_groups(inner, copy_axes, G, S)
                embed_rows = lambda c_G, t_bxT: rows_of_groups(
                    on_groups(lambda c, t: embed(c, t, None))(c_G, groups(t_bxT, ("batch", "length"))), S)
                head_loss = lambda c_G, y_bxTxD, t_bxT: on_groups(lambda c, y, t: loss(head(c, y), t))(
                    c_G, groups(y_bxTxD, ("batch", "act_length", "act_embed")),
                    groups(t_bxT, ("batch", "length"))).mean()
            else:  # whole on every device of a stage
                copies_P = pipeline.stage_copies(params, P)
                embed_rows, head_loss = lambda p, t: embed(p, t, None), lambda p, y, t: loss(head(p, y), t)
            return one_f_one_b.loss(embed_rows, lambda w, x: layers(w, x, None), head_loss, copies_P, stack_LxW,
                                    stack_logical, tokens_BxT, targets_BxT, schedule, layout.constrain)
        embed_rng, layers_rng = jax.random.split(rng) if dropout else (None, None)
        if schedule is None and not copied:
            x_BxTxD = gpt.embed_fn(m, layout, not dropout, positions_T)(params, tokens_BxT, embed_rng)
            y_BxTxD = run_layers(x_BxTxD, stack_LxW, layers_rng, layer_grad_sum)
            return loss(gpt.head_fn(m, layout)(params, y_BxTxD), targets_BxT)
        # The embedding and the head run in groups of the batch's rows, each group with its own copy of
        # the weights outside the layers, whose gradients from every group are summed once: one group a
        # pipeline stage (pipeline.stage_copies), or one a device of the batch's axes (copy_axes)
        if schedule:
            within, n, S_of = layout, schedule.stages, layout.batch_split()
            groups, on_groups = _row_groups(layout, "pipeline", n, S_of)
            copies = pipeline.stage_copies(params, n)
        else:
            within, n, S_of = inner, G, S
            groups, on_groups = _row_groups(inner, copy_axes, G, S)
            copies = copies_of(params, copy_axes)
        embed_rngs = jax.random.split(embed_rng, n) if dropout else None
        x_GxnxTxD = on_groups(gpt.embed_fn(m, within, not dropout, positions_T), 0, 0, 0 if dropout else None)(
            copies, groups(tokens_BxT, ("batch", "length")), embed_rngs)
        if schedule:
            y_GxnxTxD = pipeline.run(gpt.layers_fn(m, layout, not dropout, positions_T), stack_LxW, stack_logical,
                                     x_GxnxTxD, schedule, layout.constrain, S_of, layers_rng,
                                     bubble_value=bubble_value)
        else:
            x_BxTxD = layout.constrain(rows_of_groups(x_GxnxTxD, S), ("batch", "act_length", "act_embed"))
            y_GxnxTxD = groups(run_layers(x_BxTxD, stack_LxW, layers_rng, layer_grad_sum),
                               ("batch", "act_length", "act_embed"))
        head = gpt.head_fn(m, within)
        return on_groups(lambda p, y, t: loss(head(p, y), t))(copies, y_GxnxTxD,
                                                               groups(targets_BxT, ("batch", "length"))).mean()

    def run_layers(x_BxTxD, stack_LxW, rng, layer_grad_sum):
        """The layers in the model's own loop; their gradients added into layer_grad_sum where given."""
        if layer_grad_sum is None:
            return gpt.layers_fn(m, layout, not dropout, positions_T)(stack_LxW, x_BxTxD, rng)
        rngs_L = gpt.layer_rngs(m, not dropout, rng, m.num_layers)
        return accumulation.run_layers_into(gpt.layer_fn(m, layout, not dropout, positions_T), stack_LxW,
                                            layer_grad_sum, x_BxTxD, rngs_L, stack_shapes, m.scan_unroll)

    return loss_fn


def _row_groups(within: Layout, axes, G: int, S: int):
    """(groups, on_groups) for G groups of the batch's rows over the mesh `axes`: groups(x_BxZ,
    logical) is row_groups' [G, B/G, ...] laid out on `axes` and as `within` lays out the rest;
    on_groups(f, *in_axes) vmaps f over the groups."""
    groups = lambda x_BxZ, logical: jax.lax.with_sharding_constraint(
        row_groups(x_BxZ, G, S), NamedSharding(within.mesh, PartitionSpec(axes, *within.spec(logical))))
    on_groups = lambda f, *in_axes: jax.vmap(f, in_axes=in_axes or 0, spmd_axis_name=axes)
    return groups, on_groups


def _leaves(logical_tree) -> list:
    return jax.tree_util.tree_leaves(logical_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def make_eval_step(cfg: Config, plan: StatePlan, mesh: Mesh, schedule: Schedule | None):
    """Returns jitted (params, tokens_Bx(T+1)) -> mean loss."""
    loss_fn = loss_function(cfg, plan.layouts.params, schedule, train=False)
    return jax.jit(lambda params, tokens_BxT1: loss_fn(plan.unpad_params(params), tokens_BxT1, None),
                   in_shardings=(plan.shardings.params, batch_sharding(mesh)), out_shardings=replicated(mesh))


def make_train_step(cfg: Config, tx: AdamW, plan: StatePlan, mesh: Mesh, schedule: Schedule | None):
    """Returns jitted (state, tokens_Bx(T+1)) -> (state, metrics); the state argument is donated.
    schedule: the pipeline's, or None."""
    M, R = cfg.train.microbatches, replicas(cfg.mesh.zero_stage, mesh)
    # With data replicas (R > 1) the gradients stay unreduced, [R, ...] with R on `data`, until the
    # step's one reduction (agx.parallel.data_parallel); otherwise XLA reduces them in the backward.
    layout = replica_layout(plan.layouts.params) if R > 1 else plan.layouts.params
    accumulated = replica_shardings(plan.grad_shardings) if R > 1 else plan.grad_shardings
    constrain_grads = lambda g: jax.lax.with_sharding_constraint(g, accumulated)
    reduce = (lambda g: reduce_replicas(g, plan.grad_shardings, plan.update_shardings, R)) if R > 1 else (lambda g: g)
    loss_fn = loss_function(cfg, layout, schedule, train=True, stack_shapes=plan.logical.params["layers"])

    def step_loss(params, tokens_BxT1, rng, step, layer_grad_sum=None):
        model_params = plan.unpad_params(params)  # the padding's gradient: zero
        if layer_grad_sum is not None:  # the stack as stored, as the sum: each layer cut where it runs
            model_params["layers"] = params["layers"]
        loss = loss_fn(model_params, tokens_BxT1, rng, layer_grad_sum)
        if cfg.train.fault_nan_steps:  # the fault drill: these steps' loss, and so their gradients, are NaN
            loss = loss * jnp.where(jnp.isin(step + 1, jnp.array(cfg.train.fault_nan_steps)), jnp.nan, 1.0)
        return loss

    grad_fn = jax.value_and_grad(step_loss)
    # the layers' gradients added to their sum inside the backward (agx.training.accumulation)
    fused = accumulation.applies(cfg, schedule is not None)
    if R > 1:
        grad_fn = per_replica(grad_fn, R, mesh)

    def step(state: TrainState, tokens_BxT1):
        rng = jax.random.fold_in(jax.random.key(cfg.train.seed), state.step)
        if M == 1 and not fused:
            loss, grads = grad_fn(state.params, tokens_BxT1, rng, state.step)
            loss, grads = loss.mean(), reduce(constrain_grads(grads))
        else:
            micro_MxbxT1 = jax.lax.with_sharding_constraint(split_microbatches(tokens_BxT1, M),
                                                           NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None)))

            def accumulate(carry, xs):
                loss_sum, grad_sum = carry
                m, tokens_bxT1 = xs
                rng_m = jax.random.fold_in(rng, m)
                if not fused:
                    loss, grads = grad_fn(state.params, tokens_bxT1, rng_m, state.step)
                    return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, constrain_grads(grads))), None
                loss, grads = grad_fn(state.params, tokens_bxT1, rng_m, state.step, grad_sum["layers"])
                grads = constrain_grads(grads)  # the layers' already hold grad_sum's
                summed = jax.tree_util.tree_map(jnp.add, {**grad_sum, "layers": None}, {**grads, "layers": None})
                return (loss_sum + loss, {**summed, "layers": grads["layers"]}), None

            zeros = constrain_grads(jax.tree_util.tree_map(
                lambda p: jnp.zeros(((R,) if R > 1 else ()) + p.shape, p.dtype), state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((R,) if R > 1 else (), jnp.float32), zeros),
                                            (jnp.arange(M), micro_MxbxT1))
            loss, grads = loss.mean() / M, jax.tree_util.tree_map(lambda g: g / M, reduce(grads))
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = tx.apply(grads, grad_norm, state.opt_state, state.params, take=finite)
        new_state = TrainState(step=state.step + 1, bad_steps=state.bad_steps + (~finite).astype(jnp.int32),
                               params=params, opt_state=opt_state)
        # The optimizer's own count stops on skipped steps, so its schedule runs bad_steps behind.
        return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": tx.schedule(state.step - state.bad_steps),
                           "skipped": ~finite, "bad_steps": new_state.bad_steps}

    return jax.jit(step, in_shardings=(plan.shardings, batch_sharding(mesh)),
                   out_shardings=(plan.shardings, replicated(mesh)), donate_argnums=0)
