"""Hugging Face `tokenizer.json` files from local paths (GPT-2 BPE, Llama, ...), and training a byte-level
BPE. Nothing is downloaded: a path that does not exist is an error, never a hub name."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from agx.errors import UserError

# Tried in order when no end-of-document token is named: GPT-2/GPT-NeoX, Llama/Mistral, Gemma, Llama-3.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
DEFAULT_EOD = "<|endoftext|>"


class Tokenizer:
    """A loaded `tokenizer.json` and its end-of-document id. Pickles as its path, for worker processes."""

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: no such tokenizer file (give a tokenizer.json or a folder holding one)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions with a message
            raise UserError(f"{path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        self.path, self._eod_token = path, eod_token
        candidates = (eod_token,) if eod_token else EOD_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in candidates]
        if all(i is None for i in ids):
            raise UserError(f"{path}: has no end-of-document token (looked for {', '.join(candidates)}); "
                            "name one with data.eod_token")
        self.eod = next(i for i in ids if i is not None)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text, without special tokens added (end-of-document is the caller's choice)."""
        return [np.asarray(e.ids, np.int64) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def __getstate__(self):
        return str(self.path), self._eod_token

    def __setstate__(self, state):
        self.__init__(*state)


def train_bpe(texts: Iterable[str], vocab_size: int, output: str | os.PathLike) -> Path:
    """Trains a byte-level BPE (GPT-2's scheme: every byte is a token, so any text encodes) with
    `<|endoftext|>` as id 0, and saves it atomically as `output` (a tokenizer.json path)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise UserError(f"vocab_size={vocab_size} is below the {len(alphabet) + 1} that a byte-level BPE needs")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[DEFAULT_EOD], initial_alphabet=alphabet,
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, output)
    return output
