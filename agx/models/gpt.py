"""GPT-3 (Brown et al. 2020) and the Llama/AuroraGPT architecture, as one Flax Linen model
partitioned through logical axis names.

GPT-3: pre-LayerNorm blocks, causal multi-head attention, GELU(tanh) MLP of 4·d_model, learned
positions, LM head tied to the embedding. The options of ModelConfig turn it into Llama: rotary
positions, RMSNorm, a SwiGLU MLP of its own width, grouped-query attention, no biases, an untied head.
Layers are stacked and run by lax.scan so that depth costs no compile time. Sampling runs the same
blocks over a key/value cache holding the KV heads only. The model knows no schedule: for one that
runs the layers apart from the rest (the pipeline), it offers its pieces as functions of their
parameters (embed_fn, layers_fn, head_fn).
Shape suffixes: B batch, T sequence, D d_model, H heads, K KV heads, Q head dim, F d_ff, V padded
vocab, L layers, S cached positions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from agx.config import ModelConfig
from agx.errors import UserError
from agx.parallel.mesh import Layout

# Activation checkpointing (model.remat, named in agx.config.REMAT_POLICIES): which intermediates
# of a layer the backward pass may keep.
CHECKPOINT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    # Megatron's selective recompute: keep the projections' outputs (named "projection" in Block),
    # recompute attention scores and softmax. By name: a policy that keeps dots without batch
    # dimensions keeps none under the pipeline's vmap over stages (each stage's own weights), nor
    # the stacked slices' matmuls of sequence parallelism (agx.parallel.sequence).
    "selective": jax.checkpoint_policies.save_only_these_names("projection"),
}


def _init(std: float, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class _Norm(nn.Module):
    """LayerNorm (GPT-3) or RMSNorm (Llama) of the residual stream, with flax's parameters (names,
    shapes, axes, initial values) and float32 statistics; the scale and the bias are applied by the
    layout's matmul and add, so that their gradients are reduced onto their shards by the
    collectives meant (agx.parallel.weight_gradient)."""
    cfg: ModelConfig
    layout: Layout | None = None

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg, D = self.cfg, x_BxTxD.shape[-1]
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (D,),
                             jnp.float32)
        x_BxTxD = x_BxTxD.astype(jnp.float32)
        if cfg.norm == "layernorm":
            x_BxTxD = x_BxTxD - jnp.mean(x_BxTxD, axis=-1, keepdims=True)
        normed_BxTxD = x_BxTxD * jax.lax.rsqrt(jnp.mean(x_BxTxD * x_BxTxD, axis=-1, keepdims=True) + cfg.norm_eps)
        stream = ("batch", "act_length", "act_embed")
        y_BxTxD = _matmul_of(self.layout)("xyd,d->xyd", normed_BxTxD.astype(cfg.dtype), scale_D, stream, ("embed",),
                                          stream)
        if cfg.norm == "layernorm" and cfg.bias:
            y_BxTxD = _add_of(self.layout)(y_BxTxD, self.param("bias", _zeros(("embed",)), (D,), jnp.float32),
                                           stream, ("embed",))
        return y_BxTxD


def _rotate(x_BxHxTxQ, pos_BxT, theta: float):
    """Rotary position embedding (Su et al. 2021) in the half-split layout of Megatron and Hugging
    Face Llama: dimension i pairs with i + Q/2. Computed in float32."""
    half = x_BxHxTxQ.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_Bx1xTxQh = (pos_BxT.astype(jnp.float32)[..., None] * inv_freq)[:, None]
    cos, sin = jnp.cos(angle_Bx1xTxQh), jnp.sin(angle_Bx1xTxQh)
    x1, x2 = jnp.split(x_BxHxTxQ.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxHxTxQ.dtype)


class _Weights(nn.Module):
    """The parameters of a DenseGeneral from `in_shape` to `features` (the same names, shapes, axes
    and initial values), for matmuls written out (_column_matmul, _row_matmul)."""
    features: tuple
    std: float
    axes: tuple
    use_bias: bool

    @nn.compact
    def __call__(self, in_shape: tuple):
        flat = (math.prod(in_shape), math.prod(self.features))  # DenseGeneral's initialisation
        init = lambda rng, shape, dtype: nn.initializers.normal(self.std)(rng, flat, dtype).reshape(shape)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), (*in_shape, *self.features),
                            jnp.float32)
        bias = (self.param("bias", _zeros(self.axes[len(in_shape):]), self.features, jnp.float32)
                if self.use_bias else None)
        return kernel, bias


def _einsum(equation: str, x, w, *logical):
    """A matmul without a layout, in x's dtype: the logical axes of x, w and the result unused."""
    return jnp.einsum(equation, x, w.astype(x.dtype))


def _column_matmul(h_JxLxD, kernel_DxN, axes: tuple, dtype, matmul=_einsum, lead: tuple = ("batch", "length")):
    """[*L, D] @ [D, *features] -> [*L, *features], column-parallel: the first of the features'
    logical `axes` that is 'heads', 'kv_heads', 'mlp' or 'vocab' is split over `tensor`. h comes
    as J stacked slices of the whole sequence (Layout.gather_sequence), and slice j meets the j-th
    1/J of that axis, so the matmul stays on each tensor rank. lead: the logical axes of L.
    matmul: Layout.matmul's signature."""
    J, (D, *features) = h_JxLxD.shape[0], kernel_DxN.shape
    split = next(i for i, a in enumerate(axes[1:]) if a in ("heads", "kv_heads", "mlp", "vocab"))
    f, x = "abcefg"[:len(features)], "xyz"[:len(lead)]  # the split feature f[split] is cut into j and f[split]
    if J == 1:
        return matmul(f"{x}d,d{f}->{x}{f}", h_JxLxD[0].astype(dtype), kernel_DxN,
                      (*lead, "act_embed"), axes, (*lead, *axes[1:]))
    kernel = kernel_DxN.reshape(D, *features[:split], J, features[split] // J, *features[split + 1:])
    stacked = (*axes[1:split + 1], "tensor_stack", None, *axes[split + 2:])
    y = matmul(f"j{x}d,d{f[:split]}j{f[split:]}->{x}{f[:split]}j{f[split:]}", h_JxLxD.astype(dtype),
               kernel, ("tensor_stack", *lead, "act_embed"), (axes[0], *stacked), (*lead, *stacked))
    return y.reshape(*y.shape[:len(lead)], *features)


def _row_matmul(x_BxTxN, kernel_NxD, axes: tuple, J: int, dtype, matmul=_einsum):
    """[B, T, *ins] @ [*ins, D] -> [J, B, T, D], row-parallel: ins[0] is the axis split over
    `tensor`; `axes` are the kernel's logical axes. Returns J stacked partial sums, slice j over
    the j-th 1/J of ins[0], for Layout.scatter_sequence to sum; J = 1: one, which XLA reduces."""
    B, T, n, *ins = x_BxTxN.shape
    f = "bcefgh"[:len(ins)]  # after ins[0]'s "a": jnp.einsum orders the contracted axes by letter
    if J == 1:
        return matmul(f"xya{f},a{f}d->xyd", x_BxTxN.astype(dtype), kernel_NxD,
                      ("batch", "length", *axes[:-1]), axes, ("batch", "length", "act_embed"))[None]
    x = x_BxTxN.reshape(B, T, J, n // J, *ins).astype(dtype)
    kernel = kernel_NxD.reshape(J, n // J, *ins, kernel_NxD.shape[-1])
    stacked = ("tensor_stack", None, *axes[1:-1])
    return matmul(f"xyja{f},ja{f}d->jxyd", x, kernel, ("batch", "length", *stacked), (*stacked, axes[-1]),
                  ("tensor_stack", "batch", "length", "act_embed"))


class Block(nn.Module):
    cfg: ModelConfig
    layout: Layout | None
    deterministic: bool

    def _constrain(self, x, logical):
        return x if self.layout is None else self.layout.constrain(x, logical)

    def _dropout(self, x):
        return nn.Dropout(self.cfg.dropout)(x, deterministic=self.deterministic) if self.cfg.dropout else x

    @property
    def _matmul(self):
        return _matmul_of(self.layout)

    def _stack(self, h_BxTxD):
        """The whole sequence, as J stacked slices for the column-parallel matmuls (Layout.gather_sequence)."""
        return h_BxTxD[None] if self.layout is None else self.layout.gather_sequence(h_BxTxD)

    def _column(self, h_JxBxTxD, features: tuple, name: str, std: float, axes: tuple):
        """A column-parallel projection of the stacked sequence [J, B, T, D] -> [B, T, *features],
        its output named for selective recompute. The tensor-parallel axis is the first of
        'heads', 'kv_heads', 'mlp' among `axes` (the kernel's: 'embed', then the features')."""
        cfg = self.cfg
        kernel, bias = _Weights(features, std, axes, cfg.bias, name=name)((cfg.d_model,))
        y_BxTxN = _column_matmul(h_JxBxTxD, kernel, axes, cfg.dtype, self._matmul)
        if bias is not None:
            y_BxTxN = _add_of(self.layout)(y_BxTxN, bias, ("batch", "length", *axes[1:]), axes[1:])
        return checkpoint_name(y_BxTxN, "projection")

    def _row(self, x_BxTxN, name: str, std: float, axes: tuple):
        """A row-parallel projection [B, T, *ins] -> [B, T, D], ins[0] split over `tensor`: the sum of
        the ranks' partial sums, laid out as the residual stream (Layout.scatter_sequence)."""
        cfg = self.cfg
        kernel, bias = _Weights((cfg.d_model,), std, axes, cfg.bias, name=name)(x_BxTxN.shape[2:])
        J = 1 if self.layout is None else self.layout.tensor_stack()
        partials_JxBxTxD = _row_matmul(x_BxTxN, kernel, axes, J, cfg.dtype, self._matmul)
        y_BxTxD = partials_JxBxTxD[0] if self.layout is None else self.layout.scatter_sequence(partials_JxBxTxD)
        if bias is None:
            return y_BxTxD
        return _add_of(self.layout)(y_BxTxD, bias, ("batch", "act_length", "act_embed"), axes[-1:])

    def _project_qkv(self, h_BxTxD):
        """Queries [B, H, T, Q] and keys and values [B, K, T, Q] from the normed residual stream.
        Multi-head attention uses one fused QKV matmul (GPT-3's layout); fewer KV heads one matmul
        of the regrouped weights where they lie with their query heads (_project_grouped_qkv), else
        a query matmul and a key/value one, from the sequence gathered by XLA."""
        cfg = self.cfg
        H, K, Q, std = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.init_std
        if K == H:
            qkv_BxTx3xHxQ = self._column(self._stack(h_BxTxD), (3, H, Q), "qkv", std, ("embed", "qkv", "heads", "kv"))
            qkv_BxTx3xHxQ = self._constrain(qkv_BxTx3xHxQ, ("batch", "length", "qkv", "heads", "kv"))
            # Heads-major layout for the two attention matmuls: measured 2x faster on CPU than BxTxHxQ.
            return jnp.transpose(qkv_BxTx3xHxQ, (2, 0, 3, 1, 4))
        if self.layout is None or self.layout.spec(("kv_heads",)) == self.layout.spec(("heads",)):
            return self._project_grouped_qkv(self._stack(h_BxTxD))
        # The KV heads whole on every tensor rank: their input gradient is not a partial sum of the
        # ranks', so the sequence is gathered once, whole, for both matmuls.
        h_1xBxTxD = self._constrain(h_BxTxD, ("batch", "length", "act_embed"))[None]
        q_BxTxHxQ = self._column(h_1xBxTxD, (H, Q), "q", std, ("embed", "heads", "kv"))
        q_BxTxHxQ = self._constrain(q_BxTxHxQ, ("batch", "length", "heads", "kv"))
        kv_BxTx2xKxQ = self._column(h_1xBxTxD, (2, K, Q), "kv", std, ("embed", "qkv", "kv_heads", "kv"))
        kv_BxTx2xKxQ = self._constrain(kv_BxTx2xKxQ, ("batch", "length", "qkv", "kv_heads", "kv"))
        # Each constrained on its own: otherwise their gradients meet unsharded, and XLA gathers them.
        k_BxKxTxQ, v_BxKxTxQ = (self._constrain(c, ("batch", "kv_heads", "length", "kv"))
                                for c in jnp.transpose(kv_BxTx2xKxQ, (2, 0, 3, 1, 4)))
        return jnp.transpose(q_BxTxHxQ, (0, 2, 1, 3)), k_BxKxTxQ, v_BxKxTxQ

    def _project_grouped_qkv(self, h_JxBxTxD):
        """Grouped-query attention whose KV heads lie with their query heads (split over `tensor`
        as they are, or unsplit): the "q" and "kv" weights regrouped per KV head, [D, K, H/K + 2, Q]
        (Megatron's fused GQA layout, local to each rank), and one matmul. Its input gradient is one
        sum, so tensor parallelism reduces it once, not once per projection."""
        cfg = self.cfg
        H, K, Q, D, std = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.d_model, cfg.init_std
        G = H // K
        wq, bq = _Weights((H, Q), std, ("embed", "heads", "kv"), cfg.bias, name="q")((D,))
        wkv, bkv = _Weights((2, K, Q), std, ("embed", "qkv", "kv_heads", "kv"), cfg.bias, name="kv")((D,))
        w_DxKxGp2xQ = jnp.concatenate([wq.reshape(D, K, G, Q), jnp.transpose(wkv, (0, 2, 1, 3))], axis=2)
        qkv_BxTxKxGp2xQ = _column_matmul(h_JxBxTxD, w_DxKxGp2xQ, ("embed", "kv_heads", None, "kv"), cfg.dtype,
                                         self._matmul)
        if cfg.bias:
            b_KxGp2xQ = jnp.concatenate([bq.reshape(K, G, Q), jnp.transpose(bkv, (1, 0, 2))], axis=1)
            logical = ("batch", "length", "kv_heads", None, "kv")
            qkv_BxTxKxGp2xQ = _add_of(self.layout)(qkv_BxTxKxGp2xQ, b_KxGp2xQ, logical, logical[2:])
        qkv_BxTxKxGp2xQ = checkpoint_name(qkv_BxTxKxGp2xQ, "projection")
        qkv_BxTxKxGp2xQ = self._constrain(qkv_BxTxKxGp2xQ, ("batch", "length", "kv_heads", None, "kv"))
        B, T = qkv_BxTxKxGp2xQ.shape[:2]
        q_BxHxTxQ = jnp.transpose(qkv_BxTxKxGp2xQ[:, :, :, :G].reshape(B, T, H, Q), (0, 2, 1, 3))
        k_BxKxTxQ, v_BxKxTxQ = (jnp.transpose(qkv_BxTxKxGp2xQ[:, :, :, G + i], (0, 2, 1, 3)) for i in (0, 1))
        return q_BxHxTxQ, k_BxKxTxQ, v_BxKxTxQ

    def _for_query_heads(self, kv):
        """Keys and values [B, K, S, Q] -> [B, H, S, Q]: each KV head serves H/K consecutive query heads
        (local where both are split over `tensor`)."""
        H, K = self.cfg.num_heads, self.cfg.kv_heads
        if K == H:
            return kv
        return tuple(self._constrain(jnp.repeat(c, H // K, axis=1), ("batch", "heads", "kv_length", "kv")) for c in kv)

    def _mlp(self, h_BxTxD):
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # GPT-2 scaled residual init
        h_JxBxTxD = self._stack(h_BxTxD)
        if cfg.mlp == "swiglu":  # gate and up projections fused, each tensor-parallel over F
            h_BxTx2xF = self._column(h_JxBxTxD, (2, cfg.d_ff), "fc", cfg.init_std, ("embed", "gate", "mlp"))
            h_BxTx2xF = self._constrain(h_BxTx2xF, ("batch", "length", "gate", "mlp"))
            h_BxTxF = nn.silu(h_BxTx2xF[:, :, 0]) * h_BxTx2xF[:, :, 1]
        else:
            h_BxTxF = self._column(h_JxBxTxD, (cfg.d_ff,), "fc", cfg.init_std, ("embed", "mlp"))
            h_BxTxF = nn.gelu(self._constrain(h_BxTxF, ("batch", "length", "mlp")), approximate=True)
        return self._row(h_BxTxF, "out", out_std, ("mlp", "embed"))

    def _attend(self, q_xTxQ, k_xSxQ, v_xSxQ, allowed_xTxS=None):
        """Softmax attention in float32 over any leading dimensions ([B, H] and more), the normalisation
        applied after the PV matmul (to [.., Q] instead of [.., S]). allowed_xTxS (None: all) broadcasts
        against the scores [.., T, S]. Returns the context vectors and each query's log-sum-exp,
        which lets parts of one query's keys be merged (agx.parallel.context)."""
        Q = q_xTxQ.shape[-1]
        scores_xTxS = jnp.einsum("...tq,...sq->...ts", q_xTxQ * (1 / math.sqrt(Q)), k_xSxQ,
                                 preferred_element_type=jnp.float32)
        if allowed_xTxS is not None:
            scores_xTxS = scores_xTxS + jnp.where(allowed_xTxS, 0.0, -1e30).astype(jnp.float32)
        max_xTx1 = jax.lax.stop_gradient(jnp.max(scores_xTxS, axis=-1, keepdims=True))
        unnormalized_xTxS = jnp.exp(scores_xTxS - max_xTx1)
        sum_xTx1 = jnp.sum(unnormalized_xTxS, axis=-1, keepdims=True)
        ctx_xTxQ = jnp.einsum("...ts,...sq->...tq", self._dropout(unnormalized_xTxS.astype(self.cfg.dtype)), v_xSxQ,
                              preferred_element_type=jnp.float32) / sum_xTx1
        return ctx_xTxQ, (max_xTx1 + jnp.log(sum_xTx1))[..., 0]

    def _causal_attention(self, q_xTxQ, k_xTxQ, v_xTxQ):
        """Causal self-attention over any leading dimensions, as _attend returns it; with
        model.attention_block = C, query block i attends to keys [0, (i+1)·C) only: (1 + C/T)/2 of
        the dense FLOPs and score memory, masked on the diagonal. Runs choose `auto` for their
        devices first (agx.models.attention_choice); unchosen (init, a notebook's direct call) it is
        agx's attention as configured."""
        T, C = q_xTxQ.shape[-2], self.cfg.attention_block
        C = C if C and T % C == 0 else T  # a shorter sequence than model.seq_len may not divide
        diagonal_CxC = jnp.tril(jnp.ones((C, C), dtype=bool))
        blocks = []
        for end in range(C, T + 1, C):
            allowed_CxE = jnp.concatenate([jnp.ones((C, end - C), dtype=bool), diagonal_CxC], axis=1)
            blocks.append(self._attend(q_xTxQ[..., end - C:end, :], k_xTxQ[..., :end, :], v_xTxQ[..., :end, :],
                                       allowed_CxE))
        if len(blocks) == 1:
            return blocks[0]
        return jnp.concatenate([b[0] for b in blocks], axis=-2), jnp.concatenate([b[1] for b in blocks], axis=-1)

    @nn.compact
    def __call__(self, x_BxTxD, cache=None, start_B=None, positions_T=None):
        """cache: this layer's (keys, values) [B, K, S, Q] when sampling, with start_B the position of
        x's first token in each sequence; the updated cache is then returned beside the output.
        positions_T: each slot's position when training, where they are not 0..T-1 (context
        parallelism's order, agx.parallel.context)."""
        cfg = self.cfg
        dtype = cfg.dtype
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)

        # Attention: QKV column-parallel over heads, output projection row-parallel.
        q_BxHxTxQ, k_BxKxTxQ, v_BxKxTxQ = self._project_qkv(_Norm(cfg, self.layout, name="ln_attn")(x_BxTxD))
        T = x_BxTxD.shape[1]
        if cache is None:
            pos_BxT = (jnp.arange(T) if positions_T is None else jnp.asarray(positions_T))[None]
        else:
            pos_BxT = start_B[:, None] + jnp.arange(T)
        if cfg.position == "rope":
            q_BxHxTxQ, k_BxKxTxQ = (_rotate(x, pos_BxT, cfg.rope_theta) for x in (q_BxHxTxQ, k_BxKxTxQ))
        if cache is None:  # training: the keys are this sequence's own (all its positions), under a causal mask
            k_BxKxSxQ, v_BxKxSxQ = (self._constrain(c, ("batch", "kv_heads", "kv_length", "kv"))
                                    for c in (k_BxKxTxQ, v_BxKxTxQ))
        else:  # sampling: write this block's keys at its positions, attend to everything up to them
            k_BxKxSxQ, v_BxKxSxQ = (_write_at(c, new, start_B) for c, new in zip(cache, (k_BxKxTxQ, v_BxKxTxQ)))
            k_BxKxSxQ, v_BxKxSxQ = (self._constrain(c, ("batch", "kv_heads", "cache_length", "kv"))
                                    for c in (k_BxKxSxQ, v_BxKxSxQ))
        new_cache = (k_BxKxSxQ, v_BxKxSxQ)
        if cache is not None:
            allowed_Bx1xTxS = (jnp.arange(k_BxKxSxQ.shape[2]) <= pos_BxT[:, :, None])[:, None]
            ctx_BxHxTxQ = self._attend(q_BxHxTxQ, *self._for_query_heads(new_cache), allowed_Bx1xTxS)[0]
        elif cfg.attention == "cudnn":
            ctx_BxHxTxQ = _cudnn_attention(q_BxHxTxQ, *self._for_query_heads(new_cache))
        elif self.layout is not None and self.layout.split_attention:  # the sequence split over devices
            ctx_BxHxTxQ = self.layout.split_attention(self.layout, q_BxHxTxQ, k_BxKxTxQ, v_BxKxTxQ, self._attend,
                                                      self._causal_attention)  # which gathers the keys
        else:
            ctx_BxHxTxQ = self._causal_attention(q_BxHxTxQ, *self._for_query_heads(new_cache))[0]
        ctx_BxTxHxQ = jnp.transpose(ctx_BxHxTxQ.astype(dtype), (0, 2, 1, 3))
        ctx_BxTxHxQ = self._constrain(ctx_BxTxHxQ, ("batch", "length", "heads", "kv"))
        attn_BxTxD = self._row(ctx_BxTxHxQ, "proj", out_std, ("heads", "kv", "embed"))
        x_BxTxD = self._constrain(x_BxTxD + self._dropout(attn_BxTxD), ("batch", "act_length", "act_embed"))

        # MLP: fc column-parallel, out row-parallel.
        x_BxTxD = self._constrain(x_BxTxD + self._dropout(self._mlp(_Norm(cfg, self.layout, name="ln_mlp")(x_BxTxD))),
                                  ("batch", "act_length", "act_embed"))
        return x_BxTxD if cache is None else (x_BxTxD, new_cache)


def _cudnn_attention(q_BxHxTxQ, k_BxHxTxQ, v_BxHxTxQ):
    """cuDNN's fused causal attention (flash attention: the scores never reach memory)."""
    if jax.default_backend() != "gpu":
        raise UserError(f"model.attention=cudnn needs an NVIDIA GPU; this run is on {jax.default_backend()}")
    q_BxTxHxQ, k_BxTxHxQ, v_BxTxHxQ = (jnp.swapaxes(x, 1, 2) for x in (q_BxHxTxQ, k_BxHxTxQ, v_BxHxTxQ))
    ctx_BxTxHxQ = jax.nn.dot_product_attention(q_BxTxHxQ, k_BxTxHxQ, v_BxTxHxQ, is_causal=True, implementation="cudnn")
    return jnp.swapaxes(ctx_BxTxHxQ, 1, 2)


def _write_at(cache_BxKxSxQ, new_BxKxTxQ, start_B):
    """Each sequence's new entries written into its cache from its own start position."""
    write = lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (0, s, 0))
    return jax.vmap(write)(cache_BxKxSxQ, new_BxKxTxQ, start_B)


class GPT(nn.Module):
    cfg: ModelConfig
    layout: Layout | None = None  # None: no sharding constraints (single device, abstract shapes)

    @nn.compact
    def __call__(self, tokens_BxT, deterministic: bool = True, cache=None, start_B=None, positions_T=None):
        """Returns float32 logits over the padded vocabulary.

        positions_T: each token's position where they are not 0..T-1: under a `context` mesh axis the
        caller gives the tokens in agx.parallel.context's load-balanced order, and this order.

        Sampling passes `cache`, the (keys, values) of every layer [L, B, K, S, Q], and `start_B`, each
        sequence's position of tokens_BxT[:, 0]; it gets (logits, updated cache) back.
        """
        cfg = self.cfg
        T = tokens_BxT.shape[1]
        embed = _embedding(cfg, "wte")
        pos_BxTxD = None  # rotary positions are applied inside attention
        if cfg.position == "learned":
            pos_TxD = self.param("wpe", _init(cfg.init_std, ("pos", "embed")), (cfg.seq_len, cfg.d_model))
            if cache is not None:
                pos_BxTxD = jnp.take(pos_TxD, start_B[:, None] + jnp.arange(T), axis=0)
            else:
                pos_BxTxD = _positions_of(pos_TxD, T, positions_T)
        x_BxTxD = _embed(cfg, embed.embedding, pos_BxTxD, tokens_BxT, self.layout)
        if cfg.dropout:
            x_BxTxD = nn.Dropout(cfg.dropout)(x_BxTxD, deterministic=deterministic)

        stack_LxW = self.param("layers", lambda rng: _init_stack(cfg, rng))
        if cache is None:
            rng = self.make_rng("dropout") if cfg.dropout and not deterministic else None
            x_BxTxD = layers_fn(cfg, self.layout, deterministic, positions_T)(stack_LxW, x_BxTxD, rng)
        else:  # sampling: each layer reads and returns its slice of the stacked cache
            block = Block(cfg, self.layout, True, parent=None)

            def cached_layer(x_BxTxD, params_and_cache):
                params, layer_cache = params_and_cache
                return block.apply({"params": params}, x_BxTxD, layer_cache, start_B)

            x_BxTxD, cache = jax.lax.scan(cached_layer, x_BxTxD, (stack_LxW, cache))
        if cfg.tie_embeddings:
            kernel_DxV = embed.embedding.T
        else:
            kernel_DxV = _Weights((cfg.padded_vocab,), cfg.init_std, ("embed", "vocab"), False, name="lm_head")(
                (cfg.d_model,))[0]
        logits_BxTxV = _logits(cfg, _Norm(cfg, self.layout, name="ln_f"), kernel_DxV, x_BxTxD, self.layout)
        return logits_BxTxV if cache is None else (logits_BxTxV, cache)

    def _constrain(self, x, logical):
        return _constrainer(self.layout)(x, logical)


def _constrainer(layout: Layout | None):
    return (lambda x, logical: x) if layout is None else layout.constrain


def _matmul_of(layout: Layout | None):
    """Layout.matmul, or a plain einsum without a layout."""
    return _einsum if layout is None else layout.matmul


def _add_of(layout: Layout | None):
    """Layout.add, or a plain sum (in x's dtype) without a layout."""
    return (lambda x, b, *logical: x + b.astype(x.dtype)) if layout is None else layout.add


def _positions_of(wpe_PxD, T: int, positions_T):
    """The learned position embeddings of T tokens: 0..T-1, or `positions_T` where given."""
    return wpe_PxD[:T] if positions_T is None else jnp.take(wpe_PxD, jnp.asarray(positions_T), axis=0)


def _split_sequence(layout: Layout | None) -> bool:
    return layout is not None and layout.sequence_split() > 1


def _init_stack(cfg: ModelConfig, rng):
    """The block stack: one set of weights with a leading 'layers' axis, run by lax.scan.

    A plain scan over stacked weights (rather than nn.scan) works the same on every Flax/JAX pair we
    support, and leaves the stack as one array per weight, which the pipeline splits into stages.
    """
    x_1xTxD = jnp.zeros((1, cfg.seq_len, cfg.d_model), cfg.dtype)
    init_one = lambda key: Block(cfg, None, True).init(key, x_1xTxD)["params"]
    stacked = jax.vmap(init_one)(jax.random.split(rng, cfg.num_layers))
    return jax.tree_util.tree_map(lambda box: box.replace(names=("layers",) + box.names), stacked,
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


# --- the pieces, for a schedule that runs them apart ------------------------------------------------
# `params` below is the model's parameters without the stack (params['layers']), which layers_fn
# takes alone, so that each stage holds its own layers only.

def stack_axes(cfg: ModelConfig):
    """Each stacked weight's logical axes, as a PartitionSpec whose first axis is 'layers'."""
    return nn.get_partition_spec(jax.eval_shape(lambda rng: _init_stack(cfg, rng), jax.random.key(0)))


def outside_axes(cfg: ModelConfig) -> dict:
    """The logical axes of the weights outside the layer stack (embeddings, final norm, LM head), as
    PartitionSpecs, by name as in the parameters."""
    init = lambda rng: GPT(cfg, None).init(rng, jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
    axes = dict(nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0))))
    axes.pop("layers")
    return axes


def layer_fn(cfg: ModelConfig, layout: Layout | None, deterministic: bool, positions_T=None):
    """(params, x_BxTxD, rng) -> x_BxTxD: one layer of the stack, its activations checkpointed as
    model.remat says. rng: dropout's (a key), or anything when there is no dropout."""
    dropout = bool(cfg.dropout) and not deterministic
    block = Block(cfg, layout, not dropout, parent=None)

    def one_layer(params, x_BxTxD, rng):
        return block.apply({"params": params}, x_BxTxD, positions_T=positions_T,
                           rngs={"dropout": rng} if dropout else None)

    if cfg.remat != "none":
        one_layer = jax.checkpoint(one_layer, policy=CHECKPOINT_POLICIES[cfg.remat], prevent_cse=False)
    return one_layer


def layer_rngs(cfg: ModelConfig, deterministic: bool, rng, layers: int):
    """Each layer's dropout key, or zeros without dropout (a scan needs something to slice)."""
    return jax.random.split(rng, layers) if cfg.dropout and not deterministic else jnp.zeros((layers,))


def layers_fn(cfg: ModelConfig, layout: Layout | None, deterministic: bool, positions_T=None):
    """(stack_lxW, x_BxTxD, rng) -> x_BxTxD: the consecutive layers of a stack (the whole model's
    or one stage's), by lax.scan. rng: dropout's, or None. positions_T: as GPT.__call__'s."""
    one_layer = layer_fn(cfg, layout, deterministic, positions_T)

    def run_layers(stack_lxW, x_BxTxD, rng):
        rngs_l = layer_rngs(cfg, deterministic, rng, jax.tree_util.tree_leaves(stack_lxW)[0].shape[0])
        step = lambda x_BxTxD, params_and_rng: (one_layer(params_and_rng[0], x_BxTxD, params_and_rng[1]), None)
        return jax.lax.scan(step, x_BxTxD, (stack_lxW, rngs_l), unroll=cfg.scan_unroll)[0]

    return run_layers


def embed_fn(cfg: ModelConfig, layout: Layout | None, deterministic: bool, positions_T=None):
    """(params, tokens_BxT, rng) -> x_BxTxD: the token (and learned position) embedding, as
    GPT.__call__ computes it; rng: dropout's, or None. positions_T: as GPT.__call__'s."""

    def embed(params, tokens_BxT, rng):
        pos_TxD = _positions_of(params["wpe"], tokens_BxT.shape[1], positions_T) if "wpe" in params else None
        x_BxTxD = _embed(cfg, params["wte"]["embedding"], pos_TxD, tokens_BxT, layout)
        if cfg.dropout and not deterministic:
            x_BxTxD = nn.Dropout(cfg.dropout).apply({}, x_BxTxD, deterministic=False, rngs={"dropout": rng})
        return x_BxTxD

    return embed


def head_fn(cfg: ModelConfig, layout: Layout | None):
    """(params, x_BxTxD) -> float32 logits over the padded vocabulary, as GPT.__call__ computes them."""
    norm = _Norm(cfg, layout)

    def head(params, x_BxTxD):
        kernel_DxV = params["wte"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
        final_norm = lambda y: norm.apply({"params": params["ln_f"]}, y)
        return _logits(cfg, final_norm, kernel_DxV, x_BxTxD, layout)

    return head


def _embedding(cfg: ModelConfig, name: str | None = None) -> nn.Embed:
    return nn.Embed(cfg.padded_vocab, cfg.d_model, dtype=cfg.dtype, param_dtype=jnp.float32, name=name,
                    embedding_init=_init(cfg.init_std, ("vocab", "embed")))


def _embed(cfg: ModelConfig, table_VxD, pos_TxD, tokens_BxT, layout: Layout | None):
    """The vocab-parallel lookup (each shard contributes its rows, summed; Layout.lookup), plus the
    learned positions, laid out as the residual stream (split along the sequence under sequence
    parallelism)."""
    table_VxD = table_VxD.astype(cfg.dtype)
    if layout is None:
        return jnp.take(table_VxD, tokens_BxT, axis=0) + (0 if pos_TxD is None else pos_TxD.astype(cfg.dtype))
    x_BxTxD = layout.lookup(table_VxD, tokens_BxT)
    if pos_TxD is not None:  # [T, D] when training, [B, T, D] when sampling
        x_BxTxD = layout.add(x_BxTxD, pos_TxD, ("batch", "act_length", "act_embed"),
                             ("pos", "embed") if pos_TxD.ndim == 2 else ("batch", "length", "embed"))
    return layout.constrain(x_BxTxD, ("batch", "act_length", "act_embed"))


def _logits(cfg: ModelConfig, norm, kernel_DxV, x_BxTxD, layout: Layout | None):
    """The final norm and the vocab-parallel LM head. Where each device holds whole sequences in one
    slice, one 2-D matmul: XLA's CPU backend then computes the weight gradient without a transposed
    copy of the [B·T, V] logit gradient. Not where `context` splits the sequence: the rows of
    [B·T, D] cannot be split over both the batch's axes and its, and XLA would gather them."""
    constrain = _constrainer(layout)
    x_BxTxD = norm(constrain(x_BxTxD, ("batch", "act_length", "act_embed")))
    B, T, D = x_BxTxD.shape
    h_JxBxTxD = x_BxTxD[None] if layout is None else layout.gather_sequence(x_BxTxD)
    matmul = _matmul_of(layout)
    if h_JxBxTxD.shape[0] == 1 and not _split_sequence(layout):
        logits_NxV = _column_matmul(h_JxBxTxD.reshape(1, B * T, D), kernel_DxV, ("embed", "vocab"), cfg.dtype, matmul,
                                    ("batch",))
        logits_BxTxV = logits_NxV.reshape(B, T, cfg.padded_vocab)
    else:
        logits_BxTxV = _column_matmul(h_JxBxTxD, kernel_DxV, ("embed", "vocab"), cfg.dtype, matmul, ("batch", "length"))
    return constrain(logits_BxTxV.astype(jnp.float32), ("batch", "length", "vocab"))
