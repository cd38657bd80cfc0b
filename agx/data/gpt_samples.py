"""GPT training samples the Megatron way, from one indexed dataset.

The split's documents are repeated for as many epochs as the requested samples need and shuffled
(the document index); their tokens, back to back, are cut into windows of seq_len + 1 tokens that
overlap by one and cross document boundaries (the sample index: where each window starts); the
windows are then shuffled (the shuffle index). As megatron-core's GPTDataset: one
`numpy.random.RandomState(seed)` shuffles the documents and then the samples, a last epoch that
supplies under 80% of an epoch's samples is shuffled apart from the others, and sample i is
window `shuffle_index[i]`. The indices are built with whole-array numpy and cached on disk.
"""

from __future__ import annotations

import numpy as np

from agx.data.cache import cached_arrays, cache_root, file_identity
from agx.data.indexed import IndexedDataset
from agx.errors import UserError

SEPARATE_FINAL_EPOCH_BELOW = 0.80


def parse_split(split: str) -> list[float]:
    """'990,10,0' or '98/2/0' -> normalised train/valid/test weights."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise UserError(f"data.split={split!r}: expected numbers such as 990,10,0") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"data.split={split!r}: expected up to three non-negative weights with a positive sum")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Megatron's document ranges for train, valid and test: rounded cumulative bounds, all but the
    first shifted by the rounding error so that the last one ends at num_documents."""
    bounds = [0]
    for w in parse_split(split):
        bounds.append(bounds[-1] + int(round(w * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return list(zip(bounds[:-1], bounds[1:]))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    if separate_final_epoch and num_epochs > 1:
        return np.concatenate([build_document_index(documents, num_epochs - 1, rng, False),
                               build_document_index(documents, 1, rng, False)])
    index = np.tile(documents.astype(np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_sample_index(lengths: np.ndarray, document_index: np.ndarray, seq_len: int) -> np.ndarray:
    """[num_samples + 1, 2]: (position in the document index, token offset) where each window starts.
    Window i starts at token i * seq_len of the concatenated stream and ends one token into the next."""
    ends = np.cumsum(lengths[document_index], dtype=np.int64)
    num_samples = (int(ends[-1]) - 1) // seq_len
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    where = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[where] - lengths[document_index[where]])
    dtype = np.int32 if ends[-1] < np.iinfo(np.int32).max else np.int64
    return np.stack([where, offsets], axis=1).astype(dtype)


def build_shuffle_index(num_shuffled: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of range(total) that shuffles [0, num_shuffled) and [num_shuffled, total) apart."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_shuffled, dtype=dtype)
    rng.shuffle(first)
    if num_shuffled == total:
        return first
    last = np.arange(num_shuffled, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


class GPTSamples:
    """`samples[i]` is int32 tokens [seq_len + 1] (inputs and shifted targets); len() >= num_samples."""

    def __init__(self, dataset: IndexedDataset, documents: tuple[int, int], seq_len: int, num_samples: int | None,
                 seed: int, cache_dir: str | None = None, vocab_size: int | None = None):
        self.dataset, self.seq_len, self.vocab_size = dataset, seq_len, vocab_size
        lengths = dataset.sequence_lengths
        tokens_per_epoch = int(lengths[documents[0]:documents[1]].sum(dtype=np.int64))
        if tokens_per_epoch < seq_len + 1:
            raise UserError(f"{dataset.prefix}: documents {documents[0]}..{documents[1]} hold {tokens_per_epoch} "
                            f"tokens, fewer than one sample of seq_len + 1 = {seq_len + 1}"
                            + (" (an empty dataset)" if tokens_per_epoch == 0 else ""))
        samples_per_epoch = (tokens_per_epoch - 1) // seq_len
        num_epochs = 1 if num_samples is None else max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))
        separate_final_epoch = False
        num_shuffled = None
        if num_epochs > 1:
            num_shuffled = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_len
            separate_final_epoch = num_samples - num_shuffled < int(SEPARATE_FINAL_EPOCH_BELOW * samples_per_epoch)

        def build():
            rng = np.random.RandomState(seed)
            document_index = build_document_index(np.arange(*documents), num_epochs, rng, separate_final_epoch)
            sample_index = build_sample_index(lengths, document_index, seq_len)
            total = len(sample_index) - 1
            shuffle_index = build_shuffle_index(num_shuffled if separate_final_epoch else total, total, rng)
            return document_index, sample_index, shuffle_index

        description = {"kind": "GPTSamples", "dataset": file_identity(dataset.prefix + ".idx"),
                       "documents": documents, "seq_len": seq_len, "num_epochs": num_epochs,
                       "separate_final_epoch": separate_final_epoch, "seed": seed}
        self.document_index, self.sample_index, self.shuffle_index = cached_arrays(
            cache_root(cache_dir) / "indices", description, ("document_index", "sample_index", "shuffle_index"),
            build)

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, i: int) -> np.ndarray:
        window = int(self.shuffle_index[i])
        (first, start), (last, stop) = self.sample_index[window], self.sample_index[window + 1]
        documents = self.document_index[first:last + 1]
        if first == last:
            tokens = self.dataset.get(int(documents[0]), int(start), int(stop - start) + 1)
        else:
            tokens = np.concatenate([self.dataset.get(int(documents[0]), int(start))]
                                    + [self.dataset.get(int(d)) for d in documents[1:-1]]
                                    + [self.dataset.get(int(documents[-1]), 0, int(stop) + 1)])
        if self.vocab_size is not None and tokens.max() >= self.vocab_size:
            raise UserError(f"{self.dataset.prefix}.bin: token id {int(tokens.max())} is outside the model's "
                            f"vocabulary of {self.vocab_size} (was it tokenized with another tokenizer?)")
        return tokens.astype(np.int32)
