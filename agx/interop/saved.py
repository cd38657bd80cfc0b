"""agx checkpoints as sources of parameters, read piece by piece.

Two layouts are understood, both plain Orbax on disk:
  a training step   WORKDIR/checkpoints/STEP/{state,config}   (or the WORKDIR: its newest step)
  a params export   DIR/{params,config.json,tokenizer.json}   (`python -m agx.export --format orbax`)

Arrays are read with TensorStore, chunk by chunk (the chunks Orbax wrote, at most CHUNK_BYTES), and
placed onto any mesh with `jax.make_array_from_callback`, so each device's shard is read on its own.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import product
from pathlib import Path

import jax
import numpy as np
import tensorstore as ts

from agx.checkpoint import checksums
from agx.config import Config
from agx.errors import UserError

Index = tuple[slice, ...]


class OrbaxParams:
    """The parameters of an agx checkpoint: names 'layers.fc.kernel', ..., shapes, chunked reads."""

    def __init__(self, path: Path):
        self.path = path = Path(path)
        if (path / "checkpoints").is_dir():  # a workdir: its newest complete step
            steps = sorted((int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit()), reverse=True)
            if not steps:
                raise UserError(f"{path}/checkpoints holds no complete checkpoint")
            path = path / "checkpoints" / str(steps[0])
        if (path / "state").is_dir() and (path / "config" / "metadata").is_file():
            self.arrays, config_file = path / "state", path / "config" / "metadata"
            try:  # what is exported must be what was saved
                checksums.verify(path)
            except (checksums.ChecksumMismatch, checksums.MissingFiles) as e:
                raise UserError(f"{path} does not match its checksums ({e}); choose an earlier step") from None
        elif (path / "params").is_dir() and (path / "config.json").is_file():
            self.arrays, config_file = path / "params", path / "config.json"
        else:
            raise UserError(f"{path}: not an agx checkpoint (expected a workdir, a step folder holding state/ "
                            "and config/, or an export holding params/ and config.json)")
        self.step_dir = path
        self.cfg = Config.from_dict(json.loads(config_file.read_text()))
        self._open = {}
        # The logical shapes: a training step records them, as its arrays may be stored padded.
        logical = path / "shapes" / "metadata"
        recorded = json.loads(logical.read_text()) if logical.is_file() else {}
        self.shapes = {name: tuple(recorded.get(name, self._store(name).shape)) for name in self._saved_names()}

    def _saved_names(self) -> list[str]:
        """The parameters' names, from Orbax's tree metadata (its keys are tuples written as text)."""
        try:
            tree = json.loads((self.arrays / "_METADATA").read_text())["tree_metadata"]
            keys = [ast.literal_eval(k) for k in tree]
        except (OSError, ValueError, KeyError, SyntaxError) as e:
            raise UserError(f"{self.arrays}: unreadable Orbax metadata ({e})") from None
        return [".".join(map(str, k[1:])) for k in keys if k and k[0] == "params"]

    def check_matches(self, abstract_params) -> None:
        """Refuses a checkpoint whose parameters are not those of the model its config describes."""
        expected = {name: tuple(a.shape) for name, a in flat(abstract_params).items()}
        missing, unexpected = sorted(expected.keys() - self.shapes.keys()), sorted(self.shapes.keys() - expected.keys())
        if missing or unexpected:
            raise UserError(f"{self.step_dir}: not a checkpoint of agx's GPT (missing {missing[:3] or 'nothing'}, "
                            f"unexpected {unexpected[:3] or 'nothing'})")
        for name, shape in expected.items():
            if self.shapes[name] != shape:
                raise UserError(f"{self.step_dir}: parameter {name} has shape {self.shapes[name]}, but its "
                                f"config describes {shape}")

    def _store(self, name: str):
        if name not in self._open:
            kvstore = ({"driver": "ocdbt", "base": f"file://{self.arrays}/", "path": f"params.{name}"}
                       if (self.arrays / "manifest.ocdbt").exists() else
                       {"driver": "file", "path": f"{self.arrays}/params.{name}/"})
            errors = []
            for driver in ("zarr", "zarr3"):  # Orbax writes zarr v2 unless asked for v3
                try:
                    self._open[name] = ts.open({"driver": driver, "kvstore": kvstore}, open=True).result()
                    break
                except ValueError as e:
                    errors.append(str(e).splitlines()[0])
            else:
                raise UserError(f"{self.arrays}: cannot read parameter {name} ({errors[-1]})")
        return self._open[name]

    def chunks(self, name: str) -> Iterator[Index]:
        """The boxes the array is stored in, within its logical shape: reading one reads one stored chunk."""
        shape, chunk = self.shapes[name], self._store(name).chunk_layout.read_chunk.shape
        for corner in product(*(range(0, n, c) for n, c in zip(shape, chunk))):
            yield tuple(slice(start, min(start + c, n)) for start, c, n in zip(corner, chunk, shape))

    def read(self, name: str, index: Index) -> np.ndarray:
        return self._store(name)[index].read().result()

    def tokenizer_file(self) -> Path | None:
        """Beside the step (an export), in its workdir (an import), else as the config says."""
        workdir = self.step_dir.parent.parent
        folder = workdir if (workdir / "tokenizer.json").is_file() else self.step_dir
        return tokenizer_file(self.cfg, folder)


def flat(params) -> dict:
    """{'layers.fc.kernel': leaf, ...} of a parameter tree."""
    return {".".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def load_params(source, abstract, shardings, dtype=None):
    """Places the source's parameters onto `shardings` (a tree like `abstract`, at the shapes the
    run stores); every device reads only its own shard. Beyond the source's (logical) shape a
    shard is padded with zeros (agx.parallel.padding). `dtype`: cast on load (default: as stored)."""

    def load(path, leaf, sharding):
        name = ".".join(str(k.key) for k in path)
        logical = source.shapes[name]

        def shard(index):
            index = [slice(*s.indices(n)) for s, n in zip(index, leaf.shape)]
            inside = tuple(slice(min(s.start, n), min(s.stop, n)) for s, n in zip(index, logical))
            values = source.read(name, inside)
            values = np.pad(values, [(0, (s.stop - s.start) - (i.stop - i.start)) for s, i in zip(index, inside)])
            return values if dtype is None else values.astype(dtype)

        return jax.make_array_from_callback(leaf.shape, sharding, shard)

    return jax.tree_util.tree_map_with_path(load, abstract, shardings)


def tokenizer_file(cfg: Config, folder: Path | None = None) -> Path | None:
    """The tokenizer.json a model was trained with: one saved beside it, the config's, or the built-in
    corpus's (built if its cache is gone); None when the data named none."""
    if folder is not None and (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        return path if path.is_file() else None
    if cfg.data.paths is None:
        from agx.data.stdlib_corpus import stdlib_corpus

        return stdlib_corpus(cfg.model.vocab_size, cfg.data.cache_dir, log=lambda *_: None)[1]
    return None


@contextmanager
def atomic_folder(output: Path, force: bool):
    """Yields a temporary folder beside `output` that becomes `output` only when the block succeeds.
    An existing non-empty `output` is refused unless `force`, and then replaced only at the end."""
    output = Path(output).absolute()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise UserError(f"{output} exists and is not empty; choose another --output or pass --force")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
