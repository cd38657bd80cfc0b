"""Per-device memory and collective traffic of a training step, from the shapes and the layout
alone: what a reader can check by hand, next to what the compiler says (agx.planning.compiled).

Memory: the parameter, gradient and optimizer-state shards are exact (the planned shardings of the
real state). Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in
Large Transformer Models", Table 2, in the compute dtype: per layer s·b·h·(34 + 5·a·s/h) bytes at
16 bits for GPT-3 (the MLP's share scaled for SwiGLU and its width), the 24 of the 34 in
tensor-parallel regions divided by t (all 34 with sequence parallelism), the a·s² terms dropped by
selective recompute, and only the layer input (2·s·b·h) kept by full recompute, which then holds one
layer's activations at a time. Context parallelism (C) divides s by C, keeps (2C + block/chunk)/4
of the s² scores of a device's positions (its chunk pairs, agx.parallel.context: about (2C+1)/(4C²)
of the whole sequence's), and adds the gathered keys and values, the whole sequence's KV heads.
Pipeline stages keep each iteration's stage input instead
(agx.parallel.pipeline). Temporaries are the float32 logits and their gradient (split over pipeline
stages as well), and the weights of one layer gathered for FSDP/ZeRO-3.

Gradients: one float32 gradient-sized buffer, the running sum, where the step adds each layer's
gradient into it in the backward (agx.training.accumulation: full recompute, no pipeline); with
accumulation otherwise, a micro-batch's whole gradient beside the sum, two.
"""

from __future__ import annotations


import jax
from flax import linen as nn
from jax.sharding import PartitionSpec

from agx.config import Config
from agx.errors import UserError
from agx.parallel.mesh import kv_heads_split, logical_rules
from agx.parallel.padding import axis_names, stored_shapes
from agx.parallel.pipeline import Schedule
from agx.parallel.zero import bytes_per_device
from agx.planning.compiled import KINDS
from agx.training import accumulation

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# What each purpose of the analytic minimum moves as, on a backend that forms every collective meant
PURPOSE_KIND = {"weight all-gather": "all-gather", "updated-weight all-gather": "all-gather",
                "KV-gradient all-gather": "all-gather", "gradient reduce-scatter": "reduce-scatter",
                "tensor-parallel all-reduce": "all-reduce", "sequence-parallel all-gather": "all-gather",
                "sequence-parallel reduce-scatter": "reduce-scatter", "KV-gradient all-reduce": "all-reduce",
                "embedding and LM-head gradient all-reduce": "all-reduce", "gradient all-reduce": "all-reduce",
                "sequence-parallel weight-gradient all-reduce": "all-reduce",
                "sequence-parallel position-gradient all-gather": "all-gather",
                "cross-entropy statistics all-reduce": "all-reduce", "pipeline send/receive": "collective-permute",
                "circular weight regrouping": "all-to-all", "context K/V all-gather": "all-gather",
                "context K/V-gradient reduce-scatter": "reduce-scatter", "context gradient all-reduce": "all-reduce"}


def minimum_by_kind(minimum: dict) -> dict:
    """The analytic minimum (by purpose) by kind. ZeRO-1's one gradient reduction a step is a
    reduce-scatter onto the optimizer's shards, of the bytes the updated shards' all-gather moves
    back, and an all-reduce of the rest (the weights ZeRO-1 keeps whole); ZeRO-0's is an all-reduce."""
    out = dict.fromkeys(KINDS, 0)
    for purpose, n in minimum.items():
        if purpose != "gradient reduction":
            out[PURPOSE_KIND[purpose]] += n
    if "gradient reduction" in minimum:
        scattered = minimum.get("updated-weight all-gather", 0)
        out["reduce-scatter"] += scattered
        out["all-reduce"] += minimum["gradient reduction"] - scattered
    return out


class StateShapes:
    """The train state's shapes and logical axes, from one jax.eval_shape: nothing is allocated, and
    every layout of the same model is then sized from these alone."""

    def __init__(self, cfg: Config):
        from agx.training.optimizer import make_optimizer
        from agx.training.state import init_fn

        boxed = jax.eval_shape(init_fn(cfg, make_optimizer(cfg)), jax.random.key(0))
        self.logical, self.abstract = nn.get_partition_spec(boxed), nn.meta.unbox(boxed)
        # a search asks for the same mesh under many settings
        self._shard_bytes, self._stored, self._counts, self._spec_trees, self._split = {}, {}, {}, {}, {}

    def shard_bytes(self, part: str, sharded_over_data: bool, cfg: Config, mesh_shape: dict,
                    itemsize: int | None = None) -> int:
        """Bytes per device of `part` ('params' or 'opt_state') under the rules table, padded as the
        trainer pads them; refuses a layout whose tensor or pipeline axes do not divide an array, as
        the trainer would."""
        key = (part, sharded_over_data, cfg.mesh.zero_stage >= 1, cfg.mesh.sequence_parallel,
               tuple(sorted(mesh_shape.items())), itemsize)
        if key not in self._shard_bytes:
            stored = self.stored(cfg, mesh_shape)
            self._shard_bytes[key] = stored if isinstance(stored, str) else bytes_per_device(
                getattr(stored, part), self._specs(part, sharded_over_data, cfg, mesh_shape), mesh_shape, part,
                itemsize)
        result = self._shard_bytes[key]
        if isinstance(result, str):
            raise UserError(result)
        return result

    def stored_param_counts(self, cfg: Config, mesh_shape: dict) -> tuple[int, int]:
        """(all, the layers') parameters as the trainer stores them on this mesh: padded."""
        key = (cfg.mesh.zero_stage >= 1, cfg.mesh.sequence_parallel, tuple(sorted(mesh_shape.items())))
        if key not in self._counts:
            stored = self.stored(cfg, mesh_shape)
            if isinstance(stored, str):
                raise UserError(stored)
            count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
            self._counts[key] = count(stored.params), count(stored.params["layers"])
        return self._counts[key]

    def data_split_bytes(self, cfg: Config, mesh_shape: dict, over_data: bool) -> dict:
        """Float32 bytes per device of the parameters whole over the data-parallel axes, stored, by
        (where: 'layers', 'positions' (learned) or 'rest', how: 'split' by the data-parallel axes (over `data` too where
        over_data), 'whole' where no rule splits them (biases without an 'embed' axis), 'tensor'
        where `tensor` does not split them either: each tensor rank's whole copy)."""
        key = (cfg.mesh.zero_stage, cfg.mesh.sequence_parallel, tuple(sorted(mesh_shape.items())), over_data)
        if key not in self._split:
            self._split[key] = self._data_split_bytes(cfg, mesh_shape, over_data)
        return self._split[key]

    def _data_split_bytes(self, cfg: Config, mesh_shape: dict, over_data: bool) -> dict:
        stored = self.stored(cfg, mesh_shape)
        if isinstance(stored, str):
            raise UserError(stored)
        whole_mesh = {**mesh_shape, "data": 1, "fsdp": 1}
        specs = jax.tree_util.tree_leaves(self._specs("params", over_data, cfg, mesh_shape),
                                          is_leaf=lambda x: isinstance(x, PartitionSpec))
        out = {(where, how): 0 for where in ("layers", "positions", "rest") for how in ("split", "whole", "tensor")}
        for (path, array), spec in zip(jax.tree_util.tree_leaves_with_path(stored.params), specs):
            axes = {a for dim in spec for a in axis_names(dim)}
            where = {"['layers']": "layers", "['wpe']": "positions"}.get(jax.tree_util.keystr(path[:1]), "rest")
            nbytes = bytes_per_device([array], [spec], whole_mesh, "params", itemsize=4)
            out[where, "split" if axes & {"fsdp", "data"} else "whole"] += nbytes
            out[where, "tensor"] += 0 if "tensor" in axes else nbytes
        return out

    def stored(self, cfg: Config, mesh_shape: dict):
        """The state at its stored shapes, padded for every layout of the weights, gradients and
        moments (agx.training.state.plan_state), or why the layout cannot hold an array."""
        key = (cfg.mesh.zero_stage >= 1, cfg.mesh.sequence_parallel, tuple(sorted(mesh_shape.items())))
        if key not in self._stored:
            parts = {}
            try:
                for part in ("params", "opt_state"):
                    padded_for = [self._specs(part, False, cfg, mesh_shape),
                                  self._specs(part, cfg.mesh.zero_stage >= 1, cfg, mesh_shape)]
                    parts[part] = stored_shapes(getattr(self.abstract, part), padded_for, mesh_shape, part)
                self._stored[key] = self.abstract.replace(**parts)
            except UserError as e:
                self._stored[key] = str(e)
        return self._stored[key]

    def _specs(self, part: str, over_data: bool, cfg: Config, mesh_shape: dict):
        rules = logical_rules(over_data, cfg.mesh.sequence_parallel,
                              kv_heads_split(cfg.model.kv_heads, mesh_shape["tensor"]), cfg.mesh.zero_stage == 3)
        if (part, rules) not in self._spec_trees:
            self._spec_trees[part, rules] = jax.tree_util.tree_map(
                lambda logical: nn.logical_to_mesh_axes(tuple(logical), rules), getattr(self.logical, part),
                is_leaf=lambda x: isinstance(x, PartitionSpec))
        return self._spec_trees[part, rules]


def memory(cfg: Config, shapes: StateShapes, mesh_shape: dict, schedule: Schedule | None) -> dict:
    """Bytes per device: params, grads, optimizer state, activations, temporaries, total. `schedule`:
    the layout's pipeline schedule (agx.training.step.pipeline_schedule), None without stages."""
    m, zero, t = cfg.model, cfg.mesh.zero_stage, mesh_shape["tensor"]
    b = cfg.train.batch_size // cfg.train.microbatches // (mesh_shape["data"] * mesh_shape["fsdp"])
    # float32 logits and their gradient; the head is split over pipeline stages too, and 1F1B runs it
    # on one micro-batch at a time
    rows = b / schedule.microbatches if schedule and schedule.one_f_one_b else b / mesh_shape["pipeline"]
    logits = 2 * rows * m.seq_len / mesh_shape.get("context", 1) * m.padded_vocab / t * 4
    gathered = 0
    if mesh_shape["fsdp"] > 1 or (zero == 3 and mesh_shape["data"] > 1):  # a layer's weights gathered, and the next
        gathered = 2 * shapes.stored_param_counts(cfg, mesh_shape)[1] / m.num_layers / t * 4
    grads = shapes.shard_bytes("params", zero >= 2, cfg, mesh_shape, itemsize=4)
    if cfg.train.microbatches > 1 and not accumulation.applies(cfg, schedule is not None):
        grads *= 2  # a micro-batch's gradients, whole, beside their running sum
    result = {"params": shapes.shard_bytes("params", zero >= 3, cfg, mesh_shape),
              "grads": grads,
              "opt_state": shapes.shard_bytes("opt_state", zero >= 1, cfg, mesh_shape),
              "activations": activation_bytes(cfg, mesh_shape, schedule), "temporaries": int(logits + gathered)}
    result["total"] = sum(result.values())
    return result


def whole_kv_gradient_bytes(cfg: Config, b: int, t: int, layer_passes: float) -> dict:
    """Grouped-query attention with fewer KV heads (K) than `tensor` ranks (t): the KV weights are
    whole on every rank (agx.parallel.mesh), each rank computes every KV head, and the forward needs
    no collective. In the backward each rank's query heads give a partial gradient of their KV
    head's keys and values, [b, 1, s, Q] each; the t/K ranks that share a head sum it (an
    all-reduce), and the K sums are gathered so that every rank holds the whole dK and dV, from
    which its replicated weight gradient and its share of the input gradient follow with no further
    collective. Where K does not divide t, one all-reduce of the whole [b, K, s, Q] over t bounds it.
    (Megatron-LM requires t to divide the query groups and never keeps them whole.)"""
    m = cfg.model
    K, ring = m.kv_heads, (lambda n: (n - 1) / n)
    head = 2 * b * m.seq_len * m.head_dim * DTYPE_BYTES[m.dtype]  # one KV head's keys and values
    if t % K:
        return {"KV-gradient all-reduce": layer_passes * 2 * K * head * ring(t)}
    return {"KV-gradient all-reduce": layer_passes * 2 * head * ring(t // K),
            "KV-gradient all-gather": layer_passes * K * head * ring(K)}


def activation_bytes(cfg: Config, mesh_shape: dict, schedule: Schedule | None) -> int:
    """Per device: what the backward pass keeps, plus the most it rebuilds at once.

    With pipeline stages: every loop iteration's stage input (one micro-batch) and the micro-batch
    buffer (1F1B: 2P-1 stashed stage inputs), and one stage's layers rebuilt at a time under the
    model's remat policy."""
    m = cfg.model
    t, dp, C = mesh_shape["tensor"], mesh_shape["data"] * mesh_shape["fsdp"], mesh_shape.get("context", 1)
    b = cfg.train.batch_size // cfg.train.microbatches // dp  # sequences per device per micro-batch
    s, h, a, L = m.seq_len // C, m.d_model, m.num_heads, m.num_layers  # s: a device's positions
    c = DTYPE_BYTES[m.dtype] / 2  # Korthikanti's figures are for 16-bit activations
    sp = cfg.mesh.sequence_parallel
    # Tensor-parallel regions: Q, K, V (grouped-query K and V are repeated to every head before the
    # matmuls that keep them) and the projection input, 8; the MLP's F-wide activations, 4·F/h for
    # GELU (its input and output: 16 at F = 4h) and 8·F/h for SwiGLU (gate, up, silu(gate), product).
    mlp = (8 if m.mlp == "swiglu" else 4) * m.d_ff / h
    # Korthikanti's 5·a·s/h holds the T x T scores, softmax and dropout mask. Blocked causal
    # attention keeps (1 + C/T)/2 of them; cuDNN's fused attention none (its softmax statistics only).
    scores_kept = 0 if m.attention == "cudnn" else (1 + (m.attention_block or s) / s) / 2
    gathered_kv = 0
    if C > 1:  # 2C-1 chunk pairs of (s/2)² and 2 diagonal ones, in blocks (agx.parallel.context), of s²;
        # and the gathered keys and values, [b, K, C·s, Q] each
        chunk = s // 2
        block = m.attention_block if m.attention_block and chunk % m.attention_block == 0 else chunk
        scores_kept, gathered_kv = (2 * C + block / chunk) / 4, 4 * C * m.kv_heads / a / t
    other, tp_part, scores = (10 / t if sp else 10), (8 + mlp) / t + gathered_kv, 5 * a * s / h / t * scores_kept
    layer_input = 2 * s * b * h / (t if sp else 1)
    if m.remat == "none":
        per_layer, transient = s * b * h * (other + tp_part + scores), 0
    elif m.remat == "selective":
        per_layer, transient = s * b * h * (other + tp_part), s * b * h * scores
    else:  # full: only each layer's input is kept; one layer is rebuilt at a time in the backward
        per_layer, transient = layer_input, s * b * h * (other + tp_part + scores)
    if schedule is None:
        return int(c * (L * per_layer + transient))
    P, M, R = schedule.stages, schedule.microbatches, schedule.repeats
    if schedule.one_f_one_b:  # the stash of 2P-1 stage inputs, and the two rotating states
        kept = (2 * P + 1) * layer_input / M
    else:  # every iteration's stage input, the micro-batch buffer, the stage outputs
        kept = (schedule.iterations + M // P + 1) * layer_input / M
    one_stage = (L // (P * R) * per_layer + transient) / M
    return int(c * (kept + one_stage))


def collective_bytes(cfg: Config, shapes: StateShapes, mesh_shape: dict, schedule: Schedule | None) -> dict:
    """The least each device must send per step for this layout, by purpose. Each collective is a
    ring: an all-gather or a reduce-scatter over n devices sends (n-1)/n of the whole array, an
    all-reduce twice that. M: the step's micro-batches (train.microbatches); W: a device's share of
    the weights as stored (padded), whole over the data-parallel axes, in float32; a: one layer's
    input for one micro-batch, [b, T, D] in the compute dtype.

    - **Weight all-gather** (ZeRO-3 and FSDP; Rajbhandari et al. 2020, sec. 5): a layer's weights are
      gathered in the forward and again in the backward, every micro-batch (one gather serves a full
      recompute and the backward): 2·M·W_layers, in the compute dtype (ZeRO-3 gathers mixed-precision
      training's 16-bit weights). Under a pipeline a chunk of 1/R of a stage's weights is used every
      loop iteration (1F1B: every tick, forward and backward), and gathered each time, bubbles
      included: holding a stage's weights whole across the loop would cost what sharding them saves.
      And three times, not two, where a chunk has more than one layer: a pipeline keeps only each
      stage's input and recomputes the chunk in the backward (1F1B: from its stash), a remat whose
      gathers cannot serve the backward's without holding the chunk's gathered weights from the
      recompute's first layer to its last.
      The weights outside the layers (embeddings, final norm) once a step: one copy a device that
      every micro-batch's lookup and head use (agx.parallel.weight_gradient.gathered_copies). What
      no rule splits over the data-parallel axes (biases without an 'embed' axis) is not gathered.
    - **Gradient reduce-scatter** (ZeRO-2, ZeRO-3, FSDP; ibid.): where gradients are sharded (ZeRO-2:
      onto the gradient's shards, the weight whole over `data`), each
      micro-batch's (and each pipeline iteration's) is reduce-scattered in its backward, in float32
      (a full gradient is never held); what the data-parallel axes do not split is all-reduced.
    - **Gradient reduction** (ZeRO-0 and 1 with `data` replicas; agx.parallel.data_parallel): the
      replicas keep their gradients unreduced until one reduction a step. ZeRO-1: a reduce-scatter
      onto the optimizer's shards of each weight `data` shards there, an all-reduce of the rest
      (biases), then the **updated-weight all-gather**; ZeRO-0: an all-reduce of everything.
    - **Embedding and LM-head gradient all-reduce** (pipelines): every stage embeds and runs the head
      for its own rows (agx.parallel.pipeline), the tables, positions and final norm whole on every
      stage, summed over the stages once a step. (Megatron keeps them on the first and last stage
      and all-reduces a tied table between the two: half these bytes, for p-1 idle stages during the
      embedding and the head.)
    - **Tensor parallelism** (Shoeybi et al. 2019, fig. 4): two all-reduces of `a` a layer forward,
      two backward, plus the embedding's and the LM head's. With sequence parallelism each is an
      all-gather before the column-parallel matmul and a reduce-scatter after the row-parallel one,
      of the same bytes (Korthikanti et al. 2022, sec. 4.2.2). A full recompute runs the layer's
      forward again and needs again what feeds a matmul or the backward: the attention's all-reduce
      (the MLP's input), not the MLP's (the layer's output); with sequence parallelism both
      all-gathers and the attention's reduce-scatter. (Megatron's full recompute reruns the MLP's.)
      A pipeline's chunk recompute (above) runs each layer's forward once more, both its
      collectives, where a chunk has more than one layer (with one, XLA merges it with the layer's
      own recompute or backward). The embedding's and the head's: GPipe's stages each for their
      own rows (1/p of them); 1F1B's every stage every tick, as its layers.
    - **Sequence-parallel weight-gradient all-reduce** (Korthikanti et al. 2022, sec. 4.2.2; Megatron's
      all-reduce of the layer norms' gradients): the weights `tensor` does not split but that meet
      the sequence split over it (norms, the row-parallel biases), every micro-batch; the learned
      positions' gradient, each rank's own positions, is gathered.
    - **Cross-entropy statistics all-reduce** (Shoeybi et al. 2019, sec. 3): the vocab-parallel loss's
      per-token maximum, target logit and sum of exponentials, float32.
    - **KV-gradient collectives**: grouped-query attention with the KV heads whole on every tensor
      rank (whole_kv_gradient_bytes).
    - **Context parallelism** (agx.parallel.context): each layer gathers the KV heads' keys and values
      forward (again in the backward under full recompute, and in a pipeline's chunk recompute)
      and reduce-scatters their gradients back; the weights, whole over `context`, have their
      gradients all-reduced over it in the backward (a pipeline's layers, every loop iteration).
    - **Pipeline send/receive**: every iteration, forward and backward, the stage outputs and the
      micro-batch buffer, which is then rotated back in order (and back in the backward); 1F1B:
      every tick, one micro-batch forward and one gradient back; each device its part of the
      residual stream (split over `context`, and `tensor` under sequence parallelism). With R > 1,
      the **circular weight
      regrouping** of the stored layer order, and back: each device its own shard.
    """
    m = cfg.model
    p, d, f, t = mesh_shape["pipeline"], mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["tensor"]
    micro, C = cfg.train.microbatches, mesh_shape.get("context", 1)
    ring = lambda n: (n - 1) / n
    layer_weights = shapes.stored_param_counts(cfg, mesh_shape)[1] / p / t * 4  # float32, a tensor rank's, stored
    compute = DTYPE_BYTES[m.dtype] / 4  # a weight is cast to the compute dtype on its shards, then gathered
    # layer passes per micro-batch, bubbles included (idle stages compute on zeros)
    passes = schedule.iterations / (schedule.repeats * schedule.microbatches) if schedule else 1
    weight_passes = schedule.iterations / schedule.repeats if schedule else 1  # a stage's weights used, a micro-batch
    chunk_layers = m.num_layers // (p * schedule.repeats) if schedule else 1  # a pipeline's, each loop iteration
    out = {}
    gathered_over = f * (d if cfg.mesh.zero_stage == 3 else 1)
    stored = shapes.data_split_bytes(cfg, mesh_shape, cfg.mesh.zero_stage == 3)  # the weights' layout
    if gathered_over > 1:
        rest = stored["rest", "split"] + stored["positions", "split"]
        gathers = 3 if chunk_layers > 1 else 2  # forward, (the chunk's recompute,) backward
        layers_gathered = gathers * weight_passes * micro * stored["layers", "split"]
        out["weight all-gather"] = (layers_gathered + rest) * compute * ring(gathered_over)
    sharded_in_backward = f * (d if cfg.mesh.zero_stage >= 2 else 1)
    if sharded_in_backward > 1:
        grads = shapes.data_split_bytes(cfg, mesh_shape, cfg.mesh.zero_stage >= 2)
        total = lambda how: weight_passes * grads["layers", how] + grads["positions", how] + grads["rest", how]
        out["gradient reduce-scatter"] = micro * total("split") * ring(sharded_in_backward)
        out["gradient all-reduce"] = micro * 2 * total("whole") * ring(sharded_in_backward)
    if cfg.mesh.zero_stage <= 2 and d > 1:
        whole = shapes.shard_bytes("params", False, cfg, mesh_shape, itemsize=4)  # per device, over fsdp
        split = 0  # of which the weights that ZeRO shards over data
        if cfg.mesh.zero_stage >= 1:
            split = (whole - shapes.shard_bytes("params", True, cfg, mesh_shape, itemsize=4)) * d / (d - 1)
            out["updated-weight all-gather"] = split * ring(d)
        if cfg.mesh.zero_stage <= 1:
            out["gradient reduction"] = (2 * whole - split) * ring(d)
    if p > 1:
        outside = sum(stored[where, "split"] / gathered_over + stored[where, "whole"]
                      for where in ("positions", "rest"))
        out["embedding and LM-head gradient all-reduce"] = 2 * outside * ring(p)
    b = cfg.train.batch_size // micro // (d * f)
    activation = b * m.seq_len * m.d_model * DTYPE_BYTES[m.dtype]  # a
    # a pipeline's chunk recompute: each layer's forward again, both its collectives (with one layer a
    # chunk, XLA merges it with the layer's own recompute or backward)
    restage = 2 if chunk_layers > 1 else 0
    # the embedding's and the head's: each GPipe stage for its own rows; 1F1B's every stage, every tick
    ends = 2 * micro * (1 if not schedule else passes if schedule.one_f_one_b else 1 / p)
    if t > 1:
        layers, full = micro * m.num_layers / p * passes, m.remat == "full"
        moved = lambda per_layer: ((per_layer + restage) * layers + ends) * activation * ring(t)
        if cfg.mesh.sequence_parallel:
            out["sequence-parallel all-gather"] = moved(6 if full else 4)
            out["sequence-parallel reduce-scatter"] = moved(5 if full else 4)
        else:
            out["tensor-parallel all-reduce"] = 2 * moved(5 if full else 4)
    if t > 1 and cfg.mesh.sequence_parallel:
        unsplit = (weight_passes * stored["layers", "tensor"] + stored["rest", "tensor"]) / gathered_over
        out["sequence-parallel weight-gradient all-reduce"] = micro * 2 * unsplit * ring(t)
        out["sequence-parallel position-gradient all-gather"] = micro * stored["positions", "tensor"] * ring(t)
    if t > 1:  # for a device's tokens
        out["cross-entropy statistics all-reduce"] = micro * 3 * b * m.seq_len / (C * p) * 4 * 2 * ring(t)
    if t > 1 and not kv_heads_split(m.kv_heads, t):
        out.update(whole_kv_gradient_bytes(cfg, b, t, micro * m.num_layers / p * passes))
    if C > 1:  # [b, K, s, Q] keys and values
        kv = 2 * b * m.seq_len * m.kv_heads * m.head_dim / (t if kv_heads_split(m.kv_heads, t) else 1)
        kv *= DTYPE_BYTES[m.dtype] * micro * m.num_layers / p * passes * ring(C)
        out["context K/V all-gather"] = kv * ((2 if m.remat == "full" else 1) + restage // 2)
        out["context K/V-gradient reduce-scatter"] = kv
        # the layers' gradients every pipeline loop iteration, as their reduce-scatters (above)
        grads = shapes.data_split_bytes(cfg, mesh_shape, cfg.mesh.zero_stage >= 2)
        layer_shard = grads["layers", "split"] / sharded_in_backward + grads["layers", "whole"]
        shard = shapes.shard_bytes("params", cfg.mesh.zero_stage >= 2, cfg, mesh_shape, itemsize=4)
        out["context gradient all-reduce"] = micro * 2 * (shard + (weight_passes - 1) * layer_shard) * ring(C)
    if schedule:
        K = schedule.microbatches // p
        sent = 2 * schedule.iterations * (1 if schedule.one_f_one_b else 1 + K) + (0 if schedule.one_f_one_b else 2 * K)
        split = C * (t if cfg.mesh.sequence_parallel else 1)  # the residual stream's ('act_length')
        out["pipeline send/receive"] = micro * sent * activation / schedule.microbatches / split
        if schedule.repeats > 1:
            out["circular weight regrouping"] = micro * 2 * layer_weights / gathered_over * ring(p)
    return {k: int(v) for k, v in out.items()}
