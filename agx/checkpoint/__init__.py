"""Orbax checkpoints under WORKDIR/checkpoints/STEP, each with five items:

  state   the TrainState (step, bad_steps, params, opt_state), as Orbax's standard PyTree, at the
          shapes the run stored: padded with zeros where its mesh did not divide a dimension;
  shapes  each parameter's logical shape, as the model sees it (JSON; a plain Orbax reader cuts the
          arrays of `state` to these);
  data    the Grain iterator's state (one file per process), so the data resumes at the next batch;
  loader  what that state depends on: the loader's first batch, its workers and processes (JSON);
  config  the resolved config, as JSON;
and checksums.json, the SHA-256 of every file, written before the step is committed and checked
before it is read (agx/checkpoint/checksums.py): a step whose bytes changed is set aside.

A Grain state is only usable by a loader of the same workers and processes; when those change, the
loader restarts at the checkpoint's step instead, which is the same batch (batch s is samples
[s·B, (s+1)·B) whatever the layout).

Orbax writes each step into a temporary directory and renames it when complete, so a save cut
short is never listed as a step. Restoring takes the target shardings and stored shapes of the run
that restores, so a checkpoint loads directly onto another mesh or device count: Orbax appends
zeros to pad an array further, or drops the padding's zeros from its end. Nothing is deleted by agx:
checkpoints it will not use (unreadable, changed, newer than a chosen step, or replaced by a fresh
start) are moved to WORKDIR/set_aside/. With several processes, all of them first hear whether
each could verify a step (agx/runtime/agreement.py), so that all restore it or all set it aside.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import optax
import orbax.checkpoint as ocp

from agx.checkpoint import checksums
from agx.checkpoint.checksums import ChecksumMismatch, MissingFiles
from agx.compat import grain
from agx.config import Config, ModelConfig
from agx.errors import RunError, UserError
from agx.runtime.agreement import every_process_says

# The model fields that fix the parameters' shapes; the others (dtype, remat, dropout) may change.
SHAPE_FIELDS = ("num_layers", "d_model", "num_heads", "seq_len", "vocab_size", "vocab_multiple", "num_kv_heads",
                "ffn_size", "position", "norm", "mlp", "bias", "tie_embeddings")
# Arrays are stored in chunks of at most this size (Orbax splits the largest dimensions first), so
# that export and sampling can read a checkpoint piece by piece, never a whole stacked weight at once.
CHUNK_BYTES = 16 << 20
TRASH = "deleting"  # under checkpoints/: steps past checkpoint.keep, emptied at start and at close


@dataclass(frozen=True)
class DataPosition:
    """Where the data resumes: batch `start`, then, when the loader's layout is unchanged, Grain's
    saved iterator state (which is relative to `start`)."""

    start: int
    iterator_state: dict | None = None


@dataclass(frozen=True)
class Restored:
    state: object  # the TrainState
    iterator_state: dict | None  # Grain's, where the loader's layout is the saved one


class SavedIteratorState:
    """Takes what Grain's checkpoint handler restores (the iterator state as JSON bytes), so that a
    restore returns the data position instead of moving a loader."""

    state: dict | None = None

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # the handler starts a restored iterator; there is none here
        pass


def optax_layout(opt_state):
    """agx's AdamW state (count, mu, nu) as optax's chain(clip_by_global_norm, adamw(mask=...)) laid
    it out: the layout of agx's checkpoints before 2026-12-02, a target to restore those into."""
    return (optax.EmptyState(), (optax.ScaleByAdamState(opt_state.count, opt_state.mu, opt_state.nu),
                                 optax.MaskedState(inner_state=optax.EmptyState()),
                                 optax.ScaleByScheduleState(opt_state.count)))


def from_optax_layout(chained, like):
    """The state of optax's layout in the layout of `like` (agx's AdamW state)."""
    adam = chained[1][0]
    return like._replace(count=adam.count, mu=adam.mu, nu=adam.nu)


class Checkpoints:
    def __init__(self, workdir: Path, cfg: Config, logical_params, log=print):
        """logical_params: the parameters' ShapeDtypeStructs as the model sees them (recorded with each step)."""
        self.cfg, self.log = cfg, log
        self.logical_shapes = {".".join(str(k.key) for k in path): list(a.shape)
                               for path, a in jax.tree_util.tree_leaves_with_path(logical_params)}
        self.workdir = workdir.absolute()
        self.directory = self.workdir / "checkpoints"
        c = cfg.checkpoint
        stale = not c.resume and _steps_on_disk(self.directory)
        _all_processes_here("looked at the workdir")  # before process 0 moves anything
        if stale:  # the old run's metrics go with its checkpoints
            self._set_aside([self.directory, self.workdir / "metrics.jsonl", self.workdir / "tensorboard"],
                            "fresh-start")
        for name in ("absl", "asyncio"):  # asyncio: the write tasks Orbax abandons after a failure
            logging.getLogger(name).addFilter(OrbaxErrorsToFile(self.workdir / "train.log"))
        self._empty_trash()
        if jax.process_count() == 1:
            # Orbax splits a replicated array among its replicas, so that each host writes a part;
            # one process writes every part anyway, and the split compiled a slicing program per
            # array and replica: 2.8 s of a tiny model's first save on 8 devices.
            logging.getLogger("absl").setLevel(logging.ERROR)  # not the warning that a handler is replaced
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
        logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save at INFO
        # Old steps are renamed into TRASH first (atomic), then deleted: a kill mid-delete must not
        # leave a half-deleted step that still lists as complete.
        # Each step is committed with its checksums (agx/checkpoint/checksums.py).
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=c.keep, keep_period=c.keep_period, todelete_subdir=TRASH,
            enable_async_checkpointing=c.async_save, cleanup_tmp_directories=True, create=True,
            temporary_path_class=checksums.ChecksummedStep), handler_registry=checksums.handlers())

    def restore(self, target, loader_layout: dict) -> tuple[object, DataPosition] | None:
        """The newest readable checkpoint's state (restored into `target`'s shardings) and where the
        data resumes, for a loader of `loader_layout`; None when there is none."""
        if not self.cfg.checkpoint.resume:
            return None
        steps = sorted(self.manager.all_steps(), reverse=True)
        wanted = self.cfg.checkpoint.restore_step
        if wanted is not None:
            if wanted not in steps:
                raise UserError(f"checkpoint.restore_step={wanted}: {self.directory} holds steps "
                                f"{sorted(steps) or 'none'}")
            destination = self._set_aside([self.directory / str(s) for s in steps if s > wanted],
                                          f"after-step-{wanted}")
            if destination and (self.workdir / "metrics.jsonl").exists():  # to be cut back to `wanted`
                shutil.copy2(self.workdir / "metrics.jsonl", destination / "metrics.jsonl")
            steps = [wanted]
        for step in steps:
            try:
                self._verify(step)
                restored, saved_layout, same_layout = self._everywhere(
                    step, "read", lambda: self._read(step, target, loader_layout))  # noqa: B023 - called at once
            except UserError:
                raise
            except ChecksumMismatch as e:
                self.log(f"agx: warning: checkpoint step {step} fails its checksums ({e}); trying the one before")
                self._set_aside([self.directory / str(step)], f"corrupt-step-{step}")
                continue
            except Exception as e:  # noqa: BLE001 - any failure to read, after the retries, means: not usable
                self.log(f"agx: warning: checkpoint step {step} is unreadable ({_reason(e)}); trying the one before")
                self._set_aside([self.directory / str(step)], f"unreadable-step-{step}")
                continue
            if saved_layout is None:
                self.log(f"agx: checkpoint step {step} holds no data position (imported weights): the data "
                         f"starts at batch {step}")
            elif not same_layout:
                self.log(f"agx: the loader's layout changed ({saved_layout} then, {loader_layout} now): "
                         f"it restarts at batch {step} instead of restoring Grain's state")
            self.log(f"agx: resumed from checkpoint step {step} in {self.directory}")
            position = (DataPosition(saved_layout["start"], restored.iterator_state) if same_layout
                        else DataPosition(step))
            return restored.state, position
        return None

    def _verify(self, step: int) -> None:
        """Checks step `step` against its checksums, each process its share of the files."""
        folder, process, count = self.directory / str(step), jax.process_index(), jax.process_count()
        verified = self._everywhere(step, "verified", lambda: checksums.verify(folder, process, count))
        if verified is None:
            self.log(f"agx: checkpoint step {step} holds no checksums (saved by an older agx): read unverified")
        else:
            self.log(f"agx: checkpoint step {step}: checksums match ({verified['files']} files, "
                     f"{verified['bytes'] / 2**20:.1f} MiB hashed in {verified['seconds']:.3g} s"
                     f"{' by process 0' if count > 1 else ''})")

    def _everywhere(self, step: int, done: str, attempt):
        """attempt() on every process (with retries); then every process hears how it went on every
        other (within runtime.init_timeout_s), and all go on or all raise. So processes that see
        different things (one host's stale view of the file system) still take one decision: all
        restore the step, or all set it aside, and none waits at a barrier the others never reach."""
        try:
            result, mine = self._with_retries(step, attempt), None
        except UserError:  # the same on every process (the same config, the same files)
            raise
        except Exception as e:  # noqa: BLE001 - reported to every process below
            result, mine = None, {"mismatch" if isinstance(e, ChecksumMismatch) else "unreadable": _reason(e)}
        said = every_process_says(f"whether it {done} checkpoint step {step}", mine, self.cfg.runtime.init_timeout_s)
        failed = [(p, answer) for p, answer in enumerate(said) if answer]
        if failed:
            by = (lambda p: f"process {p}: ") if len(said) > 1 else (lambda p: "")
            text = "; ".join(by(p) + next(iter(answer.values())) for p, answer in failed)
            raise (ChecksumMismatch if any("mismatch" in answer for _, answer in failed) else MissingFiles)(text)
        return result

    def _with_retries(self, step: int, attempt):
        """attempt(), tried again checkpoint.read_retries times, waiting checkpoint.retry_wait_s, then
        twice that, and so on: a busy or briefly failing file system (EIO, a stale view) must not
        cost the steps since the checkpoint before. Changed bytes and a different model are no read
        errors: no retry."""
        retries, wait = self.cfg.checkpoint.read_retries, self.cfg.checkpoint.retry_wait_s
        for tried in range(retries + 1):
            try:
                return attempt()
            except (UserError, ChecksumMismatch):
                raise
            except Exception as e:  # noqa: BLE001 - whatever the storage raised
                if tried == retries:
                    raise
                self.log(f"agx: warning: reading checkpoint step {step} failed ({_reason(e)}); "
                         f"retry {tried + 1} of {retries} in {wait:g} s")
                time.sleep(wait)
                wait *= 2

    def _read(self, step: int, target, loader_layout: dict):
        """(state, the saved loader layout, whether it is this loader's) of checkpoint `step`."""
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        self._check_same_experiment(saved.config, step)
        saved_layout = self._saved_loader_layout(step)
        same_layout = saved_layout is not None and {**saved_layout, "start": 0} == {**loader_layout, "start": 0}
        saved_tree = self.manager.item_metadata(step)["state"]
        optax_era = isinstance(getattr(saved_tree, "tree", saved_tree)["opt_state"], list)
        if optax_era:
            self.log(f"agx: checkpoint step {step} holds the optimizer state in optax's layout (saved before "
                     "2026-12-02): restored into agx's")
            ours, target = target.opt_state, target.replace(opt_state=optax_layout(target.opt_state))
        # not strict: the stored shapes may be padded otherwise (the model's are checked above)
        items = dict(state=ocp.args.StandardRestore(target, strict=False))
        if same_layout:
            items.update(data=grain.checkpoint.CheckpointRestore(SavedIteratorState()))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored.state.replace(opt_state=from_optax_layout(restored.state.opt_state, ours)) if optax_era \
            else restored.state
        return Restored(state, restored.data.state if same_layout else None), saved_layout, same_layout

    def _saved_loader_layout(self, step: int) -> dict | None:
        """The loader layout saved with `step`; None for a checkpoint without a data position."""
        if not (self.directory / str(step) / "loader").is_dir():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(loader=ocp.args.JsonRestore())).loader

    def _check_same_experiment(self, saved: dict, step: int) -> None:
        mine = self.cfg.model
        theirs = {f: saved["model"].get(f, getattr(ModelConfig(), f)) for f in SHAPE_FIELDS}  # older: GPT-3's
        differs = [f"model.{f}: {theirs[f]} there, {getattr(mine, f)} here" for f in SHAPE_FIELDS
                   if theirs[f] != getattr(mine, f)]
        if differs:  # cannot be forced: the arrays would not fit
            raise UserError(f"{self.directory}/{step} holds a different model ({'; '.join(differs)}); "
                            "use another workdir or --set checkpoint.resume=false")
        if saved["name"] != self.cfg.name and not self.cfg.checkpoint.force:
            raise UserError(f"{self.directory} holds checkpoints of experiment '{saved['name']}', not "
                            f"'{self.cfg.name}'; use another workdir, or --set checkpoint.force=true to "
                            "continue from them")

    def save(self, step: int, state, loader=None, force: bool = False) -> bool:
        """Starts a save when `step` is a multiple of checkpoint.every (or `force`); returns at once
        when saving asynchronously. Without a loader (imported weights) no data position is saved."""
        if step % self.cfg.checkpoint.every and not force:
            return False
        items = dict(state=ocp.args.StandardSave(state, save_args=chunked(state)),
                     shapes=ocp.args.JsonSave(self.logical_shapes), config=ocp.args.JsonSave(self.cfg.to_dict()))
        if loader is not None:
            items.update(data=grain.checkpoint.CheckpointSave(loader.iterator),
                         loader=ocp.args.JsonSave(loader.layout()))
        try:
            return self.manager.save(step, force=True, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - raised here are the failures of the previous async save too
            raise self._save_failed(e) from e

    def wait(self) -> None:
        """Blocks until the saves in flight are on disk."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from e

    def _save_failed(self, error: Exception) -> RunError:
        self._remove_partial_saves()  # they may be what filled the disk
        self.manager.reload()
        complete = sorted(self.manager.all_steps())
        return RunError(f"a checkpoint save failed ({_reason(error)}; details in {self.workdir / 'train.log'}); "
                        f"the complete checkpoints {complete or '(none)'} in {self.directory} are intact")

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001 - a failed save was already reported by wait()
            pass
        self._remove_partial_saves()  # now that no save is in flight, a temporary directory is a failed one
        self._empty_trash()

    def _empty_trash(self) -> None:
        if jax.process_index() == 0:
            shutil.rmtree(self.directory / TRASH, ignore_errors=True)

    def _remove_partial_saves(self) -> None:
        """Best effort: after a failure Orbax's abandoned writes may still be finishing."""
        if jax.process_index() == 0:
            for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)

    def _set_aside(self, paths: list[Path], why: str) -> Path | None:
        """Moves `paths` into a new folder of WORKDIR/set_aside and returns it (None: nothing moved).
        Every process calls it; process 0 moves, and the others wait until it has."""
        destination = None
        paths = [p for p in paths if p.exists()] if jax.process_index() == 0 else []
        if paths:
            destination = self.workdir / "set_aside" / f"{time.strftime('%Y%m%d-%H%M%S')}-{why}"
            destination.mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.move(str(path), str(destination / path.name))
            self.log(f"agx: moved {', '.join(p.name for p in paths)} to {destination}")
        _all_processes_here(f"set aside {why}")
        if hasattr(self, "manager"):
            self.manager.reload()
        return destination


def _all_processes_here(name: str) -> None:
    """A barrier across processes (none in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"agx: {name}")


def chunked(tree):
    """Orbax save arguments that store every array in chunks of at most CHUNK_BYTES."""
    return jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)


class OrbaxErrorsToFile(logging.Filter):
    """Orbax logs a failed background save with its traceback; agx reports it in one line and keeps
    the traceback in train.log."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "orbax" not in record.pathname + record.getMessage():
            return True
        try:
            with open(self.path, "a") as f:
                f.write(logging.Formatter().format(record) + "\n")
        except OSError:  # the disk that failed the save may be full
            pass
        return False


def _reason(error: Exception) -> str:
    """One short line: for an OS error (TensorStore writes [os_error_code=N], its own words before
    it vary and are sometimes empty), the OS's words for N; else the error's first line."""
    text = str(error).strip()
    os_error = re.search(r"os_error_code='?(\d+)", text)
    if os_error:
        return f"{os.strerror(int(os_error.group(1)))}, errno {os_error.group(1)}"
    return text.splitlines()[0][:200] if text else type(error).__name__


def _steps_on_disk(directory: Path) -> list[int]:
    return [int(p.name) for p in directory.glob("*") if p.name.isdigit()] if directory.is_dir() else []
