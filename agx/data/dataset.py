"""From `cfg.data` to samples and batch loaders: the built-in corpus or the user's blend, split,
checked against the model's vocabulary."""

from __future__ import annotations

from agx.config import Config
from agx.data.blend import BlendedSamples, Source, parse_sources
from agx.data.loader import BatchLoader
from agx.data.stdlib_corpus import stdlib_corpus
from agx.data.tokenizer import Tokenizer
from agx.errors import UserError

SPLITS = ("train", "valid", "test")


def resolve_sources(cfg: Config, log=print) -> tuple[list[Source], Tokenizer | None]:
    data = cfg.data
    if data.paths is None:
        prefix, tokenizer_path = stdlib_corpus(cfg.model.vocab_size, data.cache_dir, log)
        return [Source(1.0, prefix, "stdlib")], Tokenizer(tokenizer_path)
    tokenizer = Tokenizer(data.tokenizer, data.eod_token) if data.tokenizer else None
    return parse_sources(data.paths), tokenizer


def train_batches(cfg: Config) -> int:
    """Batches in the training stream. Sized by the schedule (optim.decay_steps), not by train.steps,
    so that a run cut short and extended up to its decay length sees the very same samples."""
    B = cfg.train.batch_size
    batches = (cfg.data.num_samples or max(cfg.train.steps, cfg.optim.decay_steps or 0) * B) // B
    if batches < cfg.train.steps:
        raise UserError(f"data.num_samples={cfg.data.num_samples} holds {batches} batches of {B}, fewer than "
                        f"train.steps={cfg.train.steps}")
    return batches


def make_samples(cfg: Config, split: str = "train", num_samples: int | None = None, log=print) -> BlendedSamples:
    """The sample stream of one split; `num_samples` defaults to what training consumes."""
    sources, tokenizer = resolve_sources(cfg, log)
    if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens, more than model.vocab_size="
                        f"{cfg.model.vocab_size}")
    if num_samples is None:
        num_samples = train_batches(cfg) * cfg.train.batch_size
    return BlendedSamples(sources, cfg.data.split, SPLITS.index(split), cfg.model.seq_len, num_samples,
                          cfg.train.seed, cfg.data.cache_dir, cfg.model.vocab_size)


def make_loader(cfg: Config, sharding, split: str = "train", num_batches: int | None = None, log=print) -> BatchLoader:
    B = cfg.train.batch_size
    num_batches = num_batches or train_batches(cfg)
    samples = make_samples(cfg, split, num_batches * B, log)
    workers = cfg.data.workers if split == "train" else 0  # eval batches are few and read once each time
    return BatchLoader(samples, B, num_batches, sharding, cfg.model.seq_len, workers, cfg.data.prefetch)
