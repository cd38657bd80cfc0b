"""The training objective. agx.training.step applies it to the model's logits, whichever schedule
ran the layers (1F1B computes it one micro-batch at a time at its last stage)."""

import jax
import jax.numpy as jnp


def cross_entropy(logits_BxTxV, targets_BxT, vocab_size: int):
    """Mean next-token loss in float32. Padded vocabulary entries are excluded from the softmax;
    the target logit is picked with a mask, not a gather, so vocab-sharded logits stay sharded."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    vocab_V = jnp.arange(logits_BxTxV.shape[-1])
    if vocab_size < logits_BxTxV.shape[-1]:
        logits_BxTxV = jnp.where(vocab_V < vocab_size, logits_BxTxV, -jnp.inf)
    target_BxT = jnp.sum(jnp.where(vocab_V == targets_BxT[..., None], logits_BxTxV, 0.0), axis=-1)
    return jnp.mean(jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_BxT)
