"""Hugging Face GPT-2 folders, both ways: config.json, model.safetensors (sharded by size) and the
tokenizer files that `transformers.GPT2LMHeadModel.from_pretrained` and `AutoTokenizer` load.

GPT-2's Conv1D stores weights as [in, out], which is agx's kernel layout with the head axes merged,
so every tensor is agx's bytes reshaped: no transposes. The stacked [L, ...] weights become one
tensor per layer, and the embedding loses its vocabulary padding rows.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from agx.config import Config, ModelConfig
from agx.errors import UserError
from agx.interop.safetensors import SafetensorsFile, SafetensorsWriter, sync_file

# agx name -> (GPT-2 name, how many leading agx axes form GPT-2's first axis; None: flattened to 1-D)
TOP = {"wte.embedding": ("wte.weight", 1), "wpe": ("wpe.weight", 1),
       "ln_f.scale": ("ln_f.weight", None), "ln_f.bias": ("ln_f.bias", None)}
PER_LAYER = {"ln_attn.scale": ("ln_1.weight", None), "ln_attn.bias": ("ln_1.bias", None),
             "qkv.kernel": ("attn.c_attn.weight", 1), "qkv.bias": ("attn.c_attn.bias", None),
             "proj.kernel": ("attn.c_proj.weight", 2), "proj.bias": ("attn.c_proj.bias", None),
             "ln_mlp.scale": ("ln_2.weight", None), "ln_mlp.bias": ("ln_2.bias", None),
             "fc.kernel": ("mlp.c_fc.weight", 1), "fc.bias": ("mlp.c_fc.bias", None),
             "out.kernel": ("mlp.c_proj.weight", 1), "out.bias": ("mlp.c_proj.bias", None)}
PREFIX = "transformer."  # as GPT2LMHeadModel.save_pretrained writes them; the tied lm_head is not stored
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # transformers' default max_shard_size
TO_CONVERT = ("python -c \"from transformers import GPT2LMHeadModel as M; M.from_pretrained('{d}')"
              ".save_pretrained('{d}', safe_serialization=True)\" (this unpickles the .bin: only for files you trust)")


def _hf_shape(agx_shape: tuple[int, ...], split: int | None) -> tuple[int, ...]:
    if split is None:
        return (math.prod(agx_shape),)
    return (math.prod(agx_shape[:split]), math.prod(agx_shape[split:]))


class TensorMap:
    """Where each GPT-2 tensor comes from: (agx name, layer or None, agx shape of the piece)."""

    def __init__(self, m: ModelConfig, agx_shapes: dict[str, tuple[int, ...]]):
        self.vocab_size = m.vocab_size
        self.tensors: dict[str, tuple[str, int | None, tuple[int, ...], tuple[int, ...]]] = {}
        for name, (hf, split) in TOP.items():
            shape = agx_shapes[name]
            if name == "wte.embedding":
                shape = (m.vocab_size,) + shape[1:]
            self.tensors[PREFIX + hf] = (name, None, shape, _hf_shape(shape, split))
        for layer in range(m.num_layers):
            for name, (hf, split) in PER_LAYER.items():
                shape = agx_shapes[f"layers.{name}"][1:]
                self.tensors[f"{PREFIX}h.{layer}.{hf}"] = (f"layers.{name}", layer, shape, _hf_shape(shape, split))
        self.by_agx = {(agx, layer): hf for hf, (agx, layer, _, _) in self.tensors.items()}


def hf_config(m: ModelConfig, dtype: str, eod: int | None) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
            "n_positions": m.seq_len, "n_ctx": m.seq_len, "n_embd": m.d_model, "n_layer": m.num_layers,
            "n_head": m.num_heads, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": m.init_std,
            "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
            "bos_token_id": eod, "eos_token_id": eod, "torch_dtype": dtype, "dtype": dtype}  # 4.x, 5.x names


def write_hf(source, m: ModelConfig, output: Path, dtype, tokenizer: Path | None, eod: int | None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, log=print) -> None:
    """Writes a GPT-2 folder from `source` (agx names, chunked reads), one stored chunk at a time."""
    dtype = np.dtype(dtype)
    tmap = TensorMap(m, source.shapes)
    files, size = [[]], 0  # tensors in order, cut into files of at most max_shard_bytes
    for hf, (_, _, _, shape) in tmap.tensors.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(hf)
        size += nbytes
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    writers = {}
    for file_name, hfs in zip(names, files):
        writer = SafetensorsWriter(output / file_name, {hf: (tmap.tensors[hf][3], dtype) for hf in hfs},
                                   metadata={"format": "pt"})
        writers.update({hf: writer for hf in hfs})

    for agx in dict.fromkeys(agx for agx, _, _, _ in tmap.tensors.values()):
        for index in source.chunks(agx):
            values = source.read(agx, index).astype(dtype)
            if agx.startswith("layers."):
                for offset, layer in enumerate(range(index[0].start, index[0].stop)):
                    hf = tmap.by_agx[(agx, layer)]
                    writers[hf].write(hf, index[1:], values[offset], as_shape=tmap.tensors[hf][2])
            elif agx == "wte.embedding":  # the padding rows are dropped
                rows = slice(index[0].start, min(index[0].stop, m.vocab_size))
                if rows.start < rows.stop:
                    hf = tmap.by_agx[(agx, None)]
                    writers[hf].write(hf, (rows,) + index[1:], values[: rows.stop - rows.start],
                                      as_shape=tmap.tensors[hf][2])
            else:
                hf = tmap.by_agx[(agx, None)]
                writers[hf].write(hf, index, values, as_shape=tmap.tensors[hf][2])
            del values
    for file_name in names:
        sync_file(output / file_name)
    if len(files) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for _, _, _, shape in tmap.tensors.values())
        index_json = {"metadata": {"total_size": total}, "weight_map": {hf: w.path.name for hf, w in writers.items()}}
        (output / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    (output / "config.json").write_text(json.dumps(hf_config(m, dtype.name, eod), indent=2))
    (output / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eod, "eos_token_id": eod, "max_length": m.seq_len}, indent=2))
    if tokenizer is None:
        log("agx: warning: no tokenizer is known for this checkpoint (its data named none): "
            "the folder holds the model only")
        return
    shutil.copy2(tokenizer, output / "tokenizer.json")
    special = json.loads(Path(tokenizer).read_text())["added_tokens"]
    eod_token = next((t["content"] for t in special if t["id"] == eod), None)
    tokens = {"bos_token": eod_token, "eos_token": eod_token, "unk_token": eod_token} if eod_token else {}
    (output / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2))
    (output / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": m.seq_len, **tokens}, indent=2))


class HFParams:
    """A local GPT-2 folder as a source of agx parameters. Reads safetensors only: nothing is unpickled."""

    def __init__(self, folder: Path):
        self.folder = folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: no config.json; not a Hugging Face model folder")
        config = json.loads((folder / "config.json").read_text())
        self.model_shape = gpt2_shape(config, folder)
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
        # GPT2Model checkpoints (OpenAI's) store 'h.0...'; GPT2LMHeadModel ones 'transformer.h.0...'
        self.stored = {name.removeprefix(PREFIX): (f, name) for name, f in stored.items()}
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
        self.m, self.tmap, self.shapes = m, TensorMap(m, agx_shapes), agx_shapes
        for hf, (_, _, _, shape) in self.tmap.tensors.items():
            name = hf.removeprefix(PREFIX)
            if name not in self.stored:
                raise UserError(f"{self.folder}: has no tensor {name}")
            f, stored_name = self.stored[name]
            if f.entries[stored_name][1] != shape:
                raise UserError(f"{self.folder}: tensor {name} has shape {f.entries[stored_name][1]}, expected {shape}")

    def _piece(self, agx: str, layer: int | None) -> np.ndarray:
        hf = self.tmap.by_agx[(agx, layer)]
        f, stored_name = self.stored[hf.removeprefix(PREFIX)]
        return f.tensor(stored_name).reshape(self.tmap.tensors[hf][2])

    def read(self, agx: str, index) -> np.ndarray:
        if agx.startswith("layers."):
            layers = range(*index[0].indices(self.m.num_layers))
            return np.stack([np.asarray(self._piece(agx, layer)[index[1:]]) for layer in layers])
        piece = self._piece(agx, None)
        if agx == "wte.embedding":  # padding rows are zeros (they never reach the softmax)
            out = np.zeros([s.stop - s.start for s in index], piece.dtype)
            rows = slice(index[0].start, min(index[0].stop, self.m.vocab_size))
            if rows.start < rows.stop:
                out[: rows.stop - rows.start] = piece[(rows,) + index[1:]]
            return out
        return np.asarray(piece[index])


def gpt2_shape(config: dict, folder: Path) -> dict:
    """agx ModelConfig shape fields from a GPT-2 config.json; anything GPT-2 with options agx's model
    does not compute is refused rather than imported wrongly."""
    kind = config.get("model_type")
    if kind != "gpt2":
        raise UserError(f"{folder}: a '{kind}' model, not GPT-2 (config.json model_type must be 'gpt2')")
    d = config["n_embd"]
    unsupported = [f"{key}={config.get(key)!r}" for key, ok in [
        ("activation_function", config.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")),
        ("n_inner", config.get("n_inner") in (None, 4 * d)),
        ("scale_attn_weights", config.get("scale_attn_weights", True)),
        ("scale_attn_by_inverse_layer_idx", not config.get("scale_attn_by_inverse_layer_idx", False)),
        ("layer_norm_epsilon", config.get("layer_norm_epsilon", 1e-5) == 1e-5),
        ("tie_word_embeddings", config.get("tie_word_embeddings", True))] if not ok]
    if unsupported:
        raise UserError(f"{folder}: GPT-2 options agx's model does not compute: {', '.join(unsupported)}")
    return {"num_layers": config["n_layer"], "d_model": d, "num_heads": config["n_head"],
            "seq_len": config["n_positions"], "vocab_size": config["vocab_size"]}
