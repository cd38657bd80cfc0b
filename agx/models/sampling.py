"""Sampling with a key/value cache: the prompts are run once (prefill), then one token per step.

Prompts of different lengths are right-padded into one batch. Each sequence writes its keys and
values from its own position on, and attends only to positions up to the current one, so the padding
is overwritten before anything reads it. The whole generation is one jitted program on the same mesh
and logical-axis rules as training: a model sharded by `tensor` or `fsdp` samples sharded.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from agx.config import Config
from agx.errors import UserError
from agx.models.gpt import GPT
from agx.parallel.batch import batch_sharding, data_parallel_size
from agx.parallel.zero import zero_layouts


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy, deterministic
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # nucleus: the smallest set of tokens holding this much probability
    seed: int = 0
    stop_at_eod: bool = True

    def check(self) -> SamplingOptions:
        if self.max_new_tokens < 1 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
        return self


def choose_tokens(logits_BxV, rng, vocab_size: int, opts: SamplingOptions):
    """The next token of each sequence: greedy at temperature 0, else sampled after top-k and top-p."""
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_size, logits_BxV.astype(jnp.float32), -jnp.inf)
    if opts.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / opts.temperature
    if opts.top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, opts.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if opts.top_p < 1:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # probability of the tokens ranked higher
        cutoff_Bx1 = jnp.min(jnp.where(before_BxV < opts.top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(rng, logits_BxV).astype(jnp.int32)


class Sampler:
    """A compiled generate(params, prompts) for one mesh, batch size, prompt length and options."""

    def __init__(self, cfg: Config, mesh: Mesh, param_shardings, batch: int, prompt_len: int,
                 opts: SamplingOptions, eod: int | None):
        m = cfg.model
        self.cfg, self.opts, self.eod = cfg, opts, eod
        # each sequence whole on every `context` device: the cache grows a position at a time
        self.layout = zero_layouts(mesh, cfg.mesh, cfg.model.kv_heads).params.whole_sequences()
        self.model = GPT(m, self.layout)
        self.length = prompt_len + opts.max_new_tokens  # cached positions
        data_parallel = data_parallel_size(mesh.shape)
        self.batch = -(-batch // data_parallel) * data_parallel  # padded to the data-parallel degree
        self.batch_sharding = batch_sharding(mesh, ndim=1)
        tokens = batch_sharding(mesh)
        self._generate = jax.jit(self._run, in_shardings=(param_shardings, tokens, self.batch_sharding, None),
                                 out_shardings=tokens)
        self._compiled = None

    def compile(self, abstract_params) -> Sampler:
        """Compiles for these parameter shapes ahead of the first call (from shapes alone)."""
        prompt_len = self.length - self.opts.max_new_tokens
        self._compiled = self._generate.lower(
            abstract_params, jax.ShapeDtypeStruct((self.batch, prompt_len), jnp.int32),
            jax.ShapeDtypeStruct((self.batch,), jnp.int32), jax.random.key(0)).compile()
        return self

    def cache_shape(self) -> tuple[int, ...]:
        """Keys' (and values') [L, B, K, S, Q]: grouped-query attention caches its KV heads only."""
        m = self.cfg.model
        return (m.num_layers, self.batch, m.kv_heads, self.length, m.head_dim)

    def _run(self, params, prompts_BxP, lengths_B, rng):
        m, opts = self.cfg.model, self.opts
        B, P = prompts_BxP.shape
        cache_shape = self.cache_shape()
        cache_sharding = self.layout.sharding(("layers", "batch", "kv_heads", "cache_length", "kv"))
        cache = tuple(jax.lax.with_sharding_constraint(jnp.zeros(cache_shape, m.dtype), cache_sharding) for _ in "kv")
        apply = lambda tokens_BxT, cache, start_B: self.model.apply({"params": params}, tokens_BxT, cache=cache,
                                                                    start_B=start_B)
        logits_BxPxV, cache = apply(prompts_BxP, cache, jnp.zeros((B,), jnp.int32))
        last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        rngs = jax.random.split(rng, opts.max_new_tokens)
        token_B = choose_tokens(last_BxV, rngs[0], m.vocab_size, opts)
        done_B = self._finished(token_B, jnp.zeros((B,), bool))

        def step(carry, inputs):
            cache, token_B, done_B = carry
            i, rng = inputs  # token_B is the i-th new token; it sits at position lengths + i
            logits_Bx1xV, cache = apply(token_B[:, None], cache, lengths_B + i)
            next_B = choose_tokens(logits_Bx1xV[:, 0], rng, m.vocab_size, opts)
            next_B = jnp.where(done_B, token_B, next_B)  # a finished sequence repeats its end token
            return (cache, next_B, self._finished(next_B, done_B)), token_B

        steps = jnp.arange(opts.max_new_tokens - 1)
        (_, last_B, _), tokens_NxB = jax.lax.scan(step, (cache, token_B, done_B), (steps, rngs[1:]))
        return jnp.concatenate([tokens_NxB.T, last_B[:, None]], axis=1)

    def _finished(self, token_B, done_B):
        if self.eod is None or not self.opts.stop_at_eod:
            return done_B
        return done_B | (token_B == self.eod)

    def __call__(self, params, prompts: list[np.ndarray]) -> list[np.ndarray]:
        """The new tokens of each prompt, up to (not including) its end-of-document token."""
        lengths = np.array([len(p) for p in prompts] + [1] * (self.batch - len(prompts)), np.int32)
        tokens = np.zeros((self.batch, self.length - self.opts.max_new_tokens), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = prompt
        generate = self._compiled or self._generate
        new = np.asarray(generate(params, tokens, lengths, jax.random.key(self.opts.seed)))
        out = []
        for row in new[: len(prompts)]:
            end = np.flatnonzero(row == self.eod) if self.eod is not None and self.opts.stop_at_eod else []
            out.append(row[: end[0]] if len(end) else row)
        return out


def check_prompts(prompts: list[np.ndarray], seq_len: int, max_new_tokens: int) -> None:
    for i, prompt in enumerate(prompts):
        if len(prompt) + max_new_tokens > seq_len:
            what = "longer than" if len(prompt) >= seq_len else f"with --max-new-tokens {max_new_tokens} longer than"
            raise UserError(f"prompt {i + 1} is {len(prompt)} tokens, {what} the model's context of {seq_len} "
                            "(model.seq_len)")
