"""A SHA-256 manifest of every file of a checkpoint, written before Orbax commits the step and
checked before a restore reads it.

Orbax keeps no checksums and TensorStore's chunks carry none: a flipped bit on disk restores in
silence, as wrong weights or a NaN a step later. So each step holds MANIFEST, {path: [bytes, sha256]}:

  at save     each process hashes the files it wrote itself (its OCDBT folder state/ocdbt.process_N)
              once its writes are done, while they are still in the page cache, and leaves its part
              beside them; process 0, which commits, hashes the rest (Orbax's metadata, the merged
              OCDBT root, the JSON items, the data iterator states), merges the parts and writes
              MANIFEST, then renames the step into place (ChecksummedStep). A step listed as
              complete therefore always has its manifest.
  at restore  every process checks that each file is there at its size, and hashes its share of
              them (dealt out by size), so the verify costs one read of the checkpoint, spread over
              the processes; what it reads, Orbax then reads again from the page cache.

Orbax's commit writes after the manifest: the commit time into _CHECKPOINT_METADATA (hashed without
that field) and, on newer Orbax, a commit_success.txt marker (not hashed).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import orbax.checkpoint as ocp

MANIFEST = "checksums.json"
PART = "checksums.process_{}.json"  # a process's part, merged into MANIFEST at commit
STEP_METADATA = "_CHECKPOINT_METADATA"
UNHASHED = {MANIFEST, "commit_success.txt"}


class ChecksumMismatch(Exception):
    """Files whose bytes are not those saved (their size may be): not a read error, never retried."""


class MissingFiles(OSError):
    """Files absent or cut short: what a stale or busy file system shows too, so worth a retry."""


def digest(path: Path) -> str:
    if path.name == STEP_METADATA:  # its commit time is written after the manifest
        try:
            fields = json.loads(path.read_bytes())
            fields.pop("commit_timestamp_nsecs", None)
            return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        except (ValueError, AttributeError):  # damaged: its raw bytes' digest, which differs
            pass
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _entries(root: Path, paths) -> dict[str, list]:
    """{path: [size, digest]}; no size for STEP_METADATA, which the commit time may lengthen."""
    return {str(p.relative_to(root)): [None if p.name == STEP_METADATA else p.stat().st_size, digest(p)]
            for p in sorted(paths)}


def _files(folder: Path):
    return (p for p in folder.rglob("*") if p.is_file())


def write_part(state_dir: Path, process: int) -> None:
    """This process's part: the OCDBT files it wrote into the TrainState's folder `state_dir` (a
    temporary name of state/ on newer Orbax), once its writes are done."""
    started = time.perf_counter()
    entries = _entries(state_dir, _files(state_dir / f"ocdbt.process_{process}"))
    _write_json(state_dir.parent / PART.format(process),
                {"files": {f"state/{name}": entry for name, entry in entries.items()},
                 "seconds": time.perf_counter() - started})


def write_manifest(step_dir: Path) -> dict:
    """Merges the processes' parts, hashes every file no part covers, and writes MANIFEST."""
    started, files, parts = time.perf_counter(), {}, []
    for part in sorted(step_dir.glob(PART.format("*"))):
        saved = json.loads(part.read_text())
        files.update(saved["files"])
        parts.append({"files": len(saved["files"]), "seconds": saved["seconds"]})
        part.unlink()
    files.update(_entries(step_dir, (p for p in _files(step_dir)
                                     if p.name not in UNHASHED and str(p.relative_to(step_dir)) not in files)))
    manifest = {"algorithm": "sha256", "files": dict(sorted(files.items())),
                "bytes": sum(size or 0 for size, _ in files.values()),
                "parts": parts, "commit_seconds": time.perf_counter() - started}
    _write_json(step_dir / MANIFEST, manifest)
    return manifest


def verify(step_dir: Path, process: int = 0, count: int = 1) -> dict | None:
    """Checks `step_dir` against its MANIFEST: every file there at its size, and the digests of
    this process's share. Raises MissingFiles or ChecksumMismatch naming the files; returns
    {files, bytes, seconds} of the share verified, or None for a step saved without a manifest."""
    started = time.perf_counter()
    try:
        text = (step_dir / MANIFEST).read_text()
    except FileNotFoundError:
        if not (step_dir / STEP_METADATA).exists():  # the step itself is gone from this view
            raise MissingFiles(f"{step_dir}/{STEP_METADATA} is missing") from None
        return None
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        raise ChecksumMismatch(f"{MANIFEST} is damaged") from None
    short = [f"{name} ({'missing' if size is None else f'{size} of {want} bytes'})"
             for name, (want, _) in files.items() if (size := _size(step_dir / name)) != want
             and not (want is None and size is not None)]
    if short:
        raise MissingFiles(_listed(short))
    mine = share(files, process, count)
    differ = [name for name in mine if digest(step_dir / name) != files[name][1]]
    if differ:
        raise ChecksumMismatch(f"content differs from its checksum: {_listed(differ)}")
    return {"files": len(mine), "bytes": sum(_bytes(files[n]) for n in mine), "seconds": time.perf_counter() - started}


def _bytes(entry: list) -> int:
    """A manifest entry's size; None (the step metadata, whose size Orbax changes at the commit) counts as 0."""
    return entry[0] or 0


def share(files: dict[str, list], process: int, count: int) -> list[str]:
    """The files `process` hashes: largest first, each to the process with the fewest bytes so far
    (the same deal on every process)."""
    loads, mine = [0] * count, []
    for name in sorted(files, key=lambda n: (-_bytes(files[n]), n)):
        least = loads.index(min(loads))
        loads[least] += _bytes(files[name])
        if least == process:
            mine.append(name)
    return mine


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _listed(problems: list[str]) -> str:
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return ", ".join(problems[:3]) + more


def _write_json(path: Path, content: dict) -> None:
    """Written whole or not at all (a part or a manifest cut short must not read as one)."""
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "w") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


class HashingStandardHandler(ocp.StandardCheckpointHandler):
    """Orbax's handler of the TrainState, which also hashes this process's files once written."""

    async def async_save(self, directory, *args, **kwargs):
        import jax

        writes = await super().async_save(directory, *args, **kwargs) or []
        state_dir, process = Path(directory), jax.process_index()
        return [ocp.future.ChainedFuture(writes, lambda: write_part(state_dir, process))]


class ChecksummedStep(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's commit (the rename of the temporary folder into the step), after writing MANIFEST.
    Newer Orbax commits each item's folder inside the step's the same way: those get no manifest
    of their own (a step's folder is named by its number, an item's is not)."""

    async def finalize(self, *args, **kwargs):
        if not Path(self.get_final()).name.isdigit():
            return await super().finalize(*args, **kwargs)
        store = getattr(self, "_checkpoint_metadata_store", None)  # STEP_METADATA may still be being written
        if store is not None:
            await asyncio.to_thread(store.wait_until_finished)
        await asyncio.to_thread(write_manifest, Path(self.get()))
        await super().finalize(*args, **kwargs)


def handlers():
    """Orbax's handler registry with the TrainState's handler replaced by HashingStandardHandler
    (the other items keep their usual handlers)."""
    registry, state = ocp.handlers.DefaultCheckpointHandlerRegistry(), HashingStandardHandler()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add("state", args, state)
    return registry
