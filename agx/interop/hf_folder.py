"""Hugging Face model folders, both ways: config.json, model.safetensors (sharded by size) and the
tokenizer files that `transformers` and `AutoTokenizer` load.

Each architecture (agx.interop.hf_gpt2, agx.interop.hf_llama) says where every Hugging Face tensor
comes from: a `Piece` of an agx parameter (one layer of the stack, one part of a fused axis, the
unpadded vocabulary), flattened to [in, out] or transposed to torch's Linear [out, in]. Export and
import then stream through the same table, one stored chunk at a time: a tensor is never whole in
memory unless a chunk is the whole tensor, and nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from agx.config import Config, ModelConfig
from agx.errors import UserError
from agx.interop import hf_gpt2, hf_llama
from agx.interop.hf_architecture import Architecture
from agx.interop.safetensors import SafetensorsFile, SafetensorsWriter, sync_file

DEFAULT_MAX_SHARD_BYTES = 5 << 30  # transformers' default max_shard_size


class TensorMap:
    """The pieces of one model, with each piece's shapes: the agx piece (layer and part axes removed,
    vocabulary cut), the stored tensor, and the stored bytes viewed in the piece's axes."""

    def __init__(self, arch: Architecture, m: ModelConfig, agx_shapes: dict[str, tuple[int, ...]]):
        self.vocab_size = m.vocab_size
        self.pieces = arch.pieces(m)
        self.shapes = {}  # hf -> (piece shape, stored shape, view shape, permutation from piece to view)
        self.by_agx: dict[str, list[str]] = {}
        for hf, p in self.pieces.items():
            shape = list(agx_shapes[p.agx][1:] if p.layer is not None else agx_shapes[p.agx])
            if p.part is not None:
                del shape[p.part[0]]
            if p.vocab_axis is not None:
                shape[p.vocab_axis] = m.vocab_size
            n, split = len(shape), p.split
            perm = tuple(range(split, n)) + tuple(range(split)) if p.transpose else tuple(range(n))
            stored = ((math.prod(shape),) if split is None else
                      (math.prod(shape[:split]), math.prod(shape[split:])))
            stored = stored[::-1] if p.transpose else stored
            self.shapes[hf] = (tuple(shape), stored, tuple(shape[i] for i in perm), perm)
            self.by_agx.setdefault(p.agx, []).append(hf)

    def placement(self, hf: str, index: tuple[slice, ...]):
        """Where tensor `hf` meets the agx box `index`: (the box's destination, as indices into an
        array of the box's shape; the piece's own slices), or None where they do not meet."""
        p = self.pieces[hf]
        dest = [slice(0, s.stop - s.start) for s in index]
        own_axes = list(range(len(index)))  # the agx axes the piece keeps
        if p.layer is not None:
            if not index[0].start <= p.layer < index[0].stop:
                return None
            dest[0] = p.layer - index[0].start
            own_axes.remove(0)
        if p.part is not None:
            axis = own_axes[p.part[0]]
            if not index[axis].start <= p.part[1] < index[axis].stop:
                return None
            dest[axis] = p.part[1] - index[axis].start
            own_axes.remove(axis)
        own = [index[a] for a in own_axes]
        if p.vocab_axis is not None:
            axis, box = own_axes[p.vocab_axis], own[p.vocab_axis]
            stop = min(box.stop, self.vocab_size)
            if stop <= box.start:
                return None  # only padding rows
            own[p.vocab_axis] = slice(box.start, stop)
            dest[axis] = slice(0, stop - box.start)
        return tuple(dest), tuple(own)


def _architectures() -> dict[str, Architecture]:
    return {arch.model_type: arch for arch in (hf_gpt2.ARCHITECTURE, hf_llama.ARCHITECTURE)}


def choose(m: ModelConfig) -> Architecture:
    """The Hugging Face architecture that computes agx's model, or a one-line refusal."""
    unfit = {kind: arch.unfit(m) for kind, arch in _architectures().items()}
    for kind, why in unfit.items():
        if not why:
            return _architectures()[kind]
    raise UserError("no Hugging Face architecture computes this model: "
                    + "; ".join(f"{kind} needs {', '.join(why)}" for kind, why in unfit.items()))


def architecture_of(config: dict, folder: Path) -> Architecture:
    known, kind = _architectures(), config.get("model_type")
    if kind not in known:
        raise UserError(f"{folder}: a '{kind}' model; agx imports {' and '.join(known)} (config.json model_type)")
    return known[kind]


def write_hf(source, m: ModelConfig, output: Path, dtype, tokenizer: Path | None, eod: int | None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, log=print) -> str:
    """Writes the Hugging Face folder of `source` (agx names, chunked reads), one stored chunk at a
    time; returns the architecture's model_type."""
    dtype = np.dtype(dtype)
    arch = choose(m)
    tmap = TensorMap(arch, m, source.shapes)
    files, size = [[]], 0  # tensors in order, cut into files of at most max_shard_bytes
    for hf, (_, stored, _, _) in tmap.shapes.items():
        nbytes = math.prod(stored) * dtype.itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(hf)
        size += nbytes
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    writers = {}
    for file_name, hfs in zip(names, files):
        writer = SafetensorsWriter(output / file_name, {arch.prefix + hf: (tmap.shapes[hf][1], dtype) for hf in hfs},
                                   metadata={"format": "pt"})
        writers.update({hf: writer for hf in hfs})

    for agx, hfs in tmap.by_agx.items():
        for index in source.chunks(agx):
            values = source.read(agx, index).astype(dtype)
            for hf in hfs:
                where = tmap.placement(hf, index)
                if where is None:
                    continue
                dest, own = where
                _, _, view, perm = tmap.shapes[hf]
                writers[hf].write(arch.prefix + hf, tuple(own[i] for i in perm),
                                  values[dest].transpose(perm), as_shape=view)
            del values
    for file_name in names:
        sync_file(output / file_name)
    if len(files) > 1:
        total = sum(math.prod(stored) * dtype.itemsize for _, stored, _, _ in tmap.shapes.values())
        weight_map = {arch.prefix + hf: w.path.name for hf, w in writers.items()}
        (output / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (output / "config.json").write_text(json.dumps(arch.config(m, dtype.name, eod), indent=2))
    (output / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eod, "eos_token_id": eod, "max_length": m.seq_len}, indent=2))
    if tokenizer is None:
        log("agx: warning: no tokenizer is known for this checkpoint (its data named none): "
            "the folder holds the model only")
        return arch.model_type
    shutil.copy2(tokenizer, output / "tokenizer.json")
    special = json.loads(Path(tokenizer).read_text())["added_tokens"]
    eod_token = next((t["content"] for t in special if t["id"] == eod), None)
    tokens = {"bos_token": eod_token, "eos_token": eod_token, "unk_token": eod_token} if eod_token else {}
    (output / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2))
    (output / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": m.seq_len, **tokens}, indent=2))
    return arch.model_type


TO_CONVERT = ("python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{d}')"
              ".save_pretrained('{d}', safe_serialization=True)\" (this unpickles the .bin: only for files you trust)")


class HFParams:
    """A local Hugging Face folder as a source of agx parameters. Reads safetensors only: nothing is
    unpickled."""

    def __init__(self, folder: Path):
        self.folder = folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: no config.json; not a Hugging Face model folder")
        config = json.loads((folder / "config.json").read_text())
        self.arch = architecture_of(config, folder)
        try:
            self.model_shape = self.arch.model_shape(config, folder)
        except KeyError as e:
            raise UserError(f"{folder}: config.json of a {self.arch.model_type} model has no {e}") from None
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {f: SafetensorsFile(folder / f) for f in set(weight_map.values())}
            stored = {name: files[f] for name, f in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            single = SafetensorsFile(folder / "model.safetensors")
            stored = dict.fromkeys(single.entries, single)
        elif list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
            raise UserError(f"{folder}: holds only pickled PyTorch weights, which agx never loads (unpickling runs "
                            f"code from the file). Convert them to safetensors first: {TO_CONVERT.format(d=folder)}")
        else:
            raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        # e.g. OpenAI's GPT2Model checkpoints store 'h.0...', GPT2LMHeadModel ones 'transformer.h.0...'
        self.stored = {name.removeprefix(self.arch.prefix): (f, name) for name, f in stored.items()}
        self.step_dir = folder
        self.cfg = Config(name=f"hf-{folder.name}", model=ModelConfig(**self.model_shape))

    def tokenizer_file(self) -> Path | None:
        return self.folder / "tokenizer.json" if (self.folder / "tokenizer.json").is_file() else None

    def check_matches(self, abstract_params) -> None:
        """Binds the folder to the model `abstract_params` describes (as for an agx checkpoint)."""
        from agx.interop.saved import flat

        self.bind(self.cfg.model, {name: a.shape for name, a in flat(abstract_params).items()})

    def bind(self, m: ModelConfig, agx_shapes: dict[str, tuple[int, ...]]) -> None:
        """Sets the agx model the weights are read for, and checks that every tensor is there and fits."""
        self.m, self.tmap, self.shapes = m, TensorMap(self.arch, m, agx_shapes), agx_shapes
        for hf, (_, shape, _, _) in self.tmap.shapes.items():
            if hf not in self.stored:
                raise UserError(f"{self.folder}: has no tensor {hf}")
            f, stored_name = self.stored[hf]
            if f.entries[stored_name][1] != shape:
                raise UserError(f"{self.folder}: tensor {hf} has shape {f.entries[stored_name][1]}, expected {shape}")

    def read(self, agx: str, index) -> np.ndarray:
        """The agx box `index` of parameter `agx`, from the pieces it meets (vocabulary padding: zeros,
        which never reach the softmax)."""
        out = None
        for hf in self.tmap.by_agx[agx]:
            where = self.tmap.placement(hf, index)
            if where is None:
                continue
            dest, own = where
            f, stored_name = self.stored[hf]
            _, _, view, perm = self.tmap.shapes[hf]
            piece = f.tensor(stored_name).reshape(view).transpose(np.argsort(perm))
            if out is None:
                out = np.zeros([s.stop - s.start for s in index], piece.dtype)
            out[dest] = piece[own]
        return out
