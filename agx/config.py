"""Typed configuration for a whole experiment, loaded from a Python module and patched with `--set`.

Experiments are plain Python (`experiments/NAME.py` defining `config() -> Config`), so a size table or
a derived schedule is ordinary code; `--set a.b=value` then overrides any field by its dotted path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import sys
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from agx.errors import UserError

REMAT_POLICIES = ("none", "full", "selective")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PLATFORMS = ("auto", "xpu", "cuda", "cpu")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")  # gpipe becomes circular with pipeline.repeats > 1
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
# Training attention: agx's einsum softmax (any backend), cuDNN's fused flash attention (NVIDIA GPUs),
# or auto: cuDNN's where it applies, else agx's in the backend's blocks (agx.models.attention_choice).
ATTENTIONS = ("auto", "xla", "cudnn")


@dataclass
class ModelConfig:
    """The defaults are GPT-3's architecture; the Llama/AuroraGPT one is rope, rmsnorm, swiglu,
    fewer KV heads, no biases and untied embeddings (agx.recipes.llama_model)."""

    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 8
    seq_len: int = 128
    vocab_size: int = 256
    vocab_multiple: int = 128  # Megatron's --make-vocab-size-divisible-by
    num_kv_heads: int | None = None  # None: num_heads (multi-head); fewer: grouped-query; 1: multi-query
    ffn_size: int | None = None  # MLP width; None: 4·d_model
    position: str = "learned"  # one of POSITIONS: learned embeddings or rotary (RoPE)
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # one of NORMS
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # one of MLPS: GELU(tanh), or SwiGLU (gated, ffn_size wide)
    bias: bool = True  # biases on the projections and norms
    tie_embeddings: bool = True  # the LM head is the token embedding
    dropout: float = 0.0
    attention: str = "auto"  # one of ATTENTIONS
    # Causal attention in query blocks of this many positions, each block against the keys up to its
    # end only, so the masked blocks above the diagonal are never computed; 0: one masked T x T product
    # with xla, the backend's block with auto (where cuDNN's is not taken).
    attention_block: int = 0
    dtype: str = "float32"  # compute dtype; parameters, softmax and loss stay in float32
    remat: str = "none"  # activation checkpointing policy, one of REMAT_POLICIES
    scan_unroll: int = 1  # layers per iteration of the layer loop; 1 keeps compile time flat in depth
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def d_ff(self) -> int:
        return 4 * self.d_model if self.ffn_size is None else self.ffn_size

    @property
    def padded_vocab(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


@dataclass
class MeshConfig:
    """Device mesh axes; -1 takes the devices left over. `fsdp` always shards params, grads and
    optimizer state (ZeRO-3 on that axis); `zero_stage` says what is also sharded over `data`."""

    pipeline: int = 1  # pipeline stages; the layer stack is split over this axis (how: the `pipeline` section)
    data: int = -1
    fsdp: int = 1
    context: int = 1  # context parallelism: each sequence split over this axis (agx.parallel.context)
    tensor: int = 1
    zero_stage: int = 1
    sequence_parallel: bool = False  # Megatron SP: LayerNorm/dropout regions split over `tensor`


@dataclass
class PipelineConfig:
    """How the layer stack runs over the mesh.pipeline stages (the axis's size is the mesh's)."""

    schedule: str = "gpipe"  # one of PIPELINE_SCHEDULES
    microbatches: int | None = None  # M per accumulation step; None: mesh.pipeline
    repeats: int = 1  # R: chunks of layers per stage; R > 1 is the circular (interleaved) schedule


# Keys that moved: the old name still works, with a one-line notice.
RENAMED = {"model.pipeline_repeats": "pipeline.repeats", "train.pipeline_microbatches": "pipeline.microbatches",
           "train.pipeline_schedule": "pipeline.schedule"}


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32  # global sequences per step
    microbatches: int = 1  # gradient accumulation steps inside one training step
    seed: int = 0
    log_every: int = 1
    max_bad_steps: int = 10  # non-finite loss or grad norm this many steps in a row stops the run
    profile_steps: list[int] | None = None  # [first, last]: a JAX profiler trace of those steps
    peak_tflops_per_device: float | None = None  # MFU's denominator; None: agx.training.metrics.PEAK_TFLOPS
    fault_nan_steps: list[int] | None = None  # fault drill: these steps' loss is made NaN (tests the skip path)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr (GPT-3: 10%)
    warmup_steps: int = 20
    decay_steps: int | None = None  # None: decay over train.steps (Megatron's --lr-decay-iters)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class DataConfig:
    """Where tokens come from. Without `paths`, the built-in corpus (the standard library's source)."""

    paths: str | None = None  # 'w1 prefix1 w2 prefix2 ...', one prefix, or a data-file list of 'weight prefix corpus'
    tokenizer: str | None = None  # the tokenizer.json the data was made with: checked against the model
    eod_token: str | None = None  # default: found in the tokenizer's vocabulary
    split: str = "990,10,0"  # train/valid/test shares of each dataset's documents
    num_samples: int | None = None  # train samples to index; None: train.steps × train.batch_size
    cache_dir: str | None = None  # index arrays and the built-in corpus; None: $AGX_CACHE_DIR or ~/.cache/agx
    workers: int = 1  # loader worker processes (0: load in the training process)
    prefetch: int = 4  # batches buffered per worker


@dataclass
class CheckpointConfig:
    """Orbax checkpoints under WORKDIR/checkpoints; the run resumes from the newest complete one."""

    every: int = 100  # save every this many steps, and at the end and on SIGTERM/SIGUSR1
    keep: int = 3  # the newest this many are kept
    keep_period: int | None = None  # also keep every step divisible by this
    async_save: bool = True  # write in the background while training goes on
    resume: bool = True  # false: start fresh; existing checkpoints are moved aside, not deleted
    restore_step: int | None = None  # resume from this step instead of the newest
    force: bool = False  # restore even if the checkpoints are another experiment's
    read_retries: int = 3  # a checkpoint that fails to read is tried again this many times before it is set aside
    retry_wait_s: float = 2.0  # the wait before the first retry; each next one waits twice as long


@dataclass
class EvalConfig:
    every: int = 100  # 0: never; otherwise every this many steps and at the last step
    batches: int = 4  # validation batches (of train.batch_size), the same ones each time


@dataclass
class RuntimeConfig:
    """Backend and processes. Process settings left None come from the launcher's environment
    (agx.launch, PALS/PMI, OpenMPI, SLURM); see agx/runtime/launchers.py."""

    platform: str = "auto"  # one of PLATFORMS; auto takes an accelerator when one is there
    coordinator: str | None = None  # host:port of process 0's coordinator
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout_s: int = 300  # how long processes wait for each other at start


@dataclass
class Config:
    name: str = "unnamed"
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> Config:
        m, t, pipe = self.model, self.train, self.pipeline
        if m.d_model % m.num_heads:
            raise UserError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
        if m.kv_heads < 1 or m.num_heads % m.kv_heads:
            raise UserError(f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
        for name, value, known in [("model.position", m.position, POSITIONS), ("model.norm", m.norm, NORMS),
                                   ("model.mlp", m.mlp, MLPS), ("model.attention", m.attention, ATTENTIONS)]:
            if value not in known:
                raise UserError(f"{name}={value!r} is not one of {', '.join(known)}")
        if m.position == "rope" and m.head_dim % 2:
            raise UserError(f"rotary positions need an even head size; model.d_model/model.num_heads={m.head_dim}")
        if m.attention_block < 0 or (m.attention_block and m.seq_len % m.attention_block):
            raise UserError(f"model.attention_block={m.attention_block} must be 0 or divide model.seq_len={m.seq_len}")
        if m.attention == "cudnn" and (m.dtype == "float32" or m.dropout or m.attention_block):
            raise UserError("model.attention=cudnn needs model.dtype bfloat16 or float16, no model.dropout and "
                            "model.attention_block=0")
        if m.remat not in REMAT_POLICIES:
            raise UserError(f"model.remat={m.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        if m.dtype not in COMPUTE_DTYPES:
            raise UserError(f"model.dtype={m.dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if pipe.schedule not in PIPELINE_SCHEDULES:
            raise UserError(f"pipeline.schedule={pipe.schedule!r} is not one of {', '.join(PIPELINE_SCHEDULES)}")
        if self.mesh.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"mesh.zero_stage={self.mesh.zero_stage} must be 0, 1, 2 or 3")
        for name, value in [("train.steps", t.steps), ("train.batch_size", t.batch_size),
                            ("train.microbatches", t.microbatches), ("model.seq_len", m.seq_len),
                            ("model.scan_unroll", m.scan_unroll), ("pipeline.repeats", pipe.repeats),
                            ("pipeline.microbatches", 1 if pipe.microbatches is None else pipe.microbatches)]:
            if value < 1:
                raise UserError(f"{name}={value} must be at least 1")
        c = self.checkpoint
        for name, value in [("checkpoint.every", c.every), ("checkpoint.keep", c.keep),
                            ("train.max_bad_steps", t.max_bad_steps), ("eval.batches", self.eval.batches)]:
            if value < 1:
                raise UserError(f"{name}={value} must be at least 1")
        if self.eval.every < 0:
            raise UserError(f"eval.every={self.eval.every} must be 0 (never) or positive")
        if t.profile_steps is not None and (len(t.profile_steps) != 2 or not 1 <= t.profile_steps[0] <= t.profile_steps[1]):
            raise UserError(f"train.profile_steps={t.profile_steps} must be [first, last] with 1 <= first <= last")
        if c.read_retries < 0 or c.retry_wait_s < 0:
            raise UserError("checkpoint.read_retries and checkpoint.retry_wait_s must be at least 0")
        if self.data.workers < 0 or self.data.prefetch < 1:
            raise UserError("data.workers must be at least 0 and data.prefetch at least 1")
        r = self.runtime
        if r.platform not in PLATFORMS:
            raise UserError(f"runtime.platform={r.platform!r} is not one of {', '.join(PLATFORMS)}")
        if r.init_timeout_s < 1:
            raise UserError(f"runtime.init_timeout_s={r.init_timeout_s} must be at least 1")
        if t.batch_size % t.microbatches:
            raise UserError(f"train.batch_size={t.batch_size} is not divisible by train.microbatches={t.microbatches}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> Config:
        """The inverse of to_dict (a saved config); fields this version does not know are ignored, and
        those saved under an old name (RENAMED) are read under the new one."""
        saved = {name: dict(value) if isinstance(value, dict) else value for name, value in saved.items()}
        for old, new in RENAMED.items():
            (old_section, old_field), (new_section, new_field) = old.split("."), new.split(".")
            if old_field in saved.get(old_section, {}):
                saved.setdefault(new_section, {})[new_field] = saved[old_section].pop(old_field)
        sections = {}
        for f in dataclasses.fields(cls):
            if f.name != "name":  # every other field is a section
                section = f.default_factory
                known = {g.name for g in dataclasses.fields(section)}
                sections[f.name] = section(**{k: v for k, v in saved.get(f.name, {}).items() if k in known})
        return cls(name=saved.get("name", "unnamed"), **sections).validate()


def _coerce(text: str, hint, key: str):
    """Parses `text` as the annotated type of a config field; lists are written [a,b,...]."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if not (text.startswith("[") and text.endswith("]")):
            raise UserError(f"--set {key}={text}: expected a list such as [1,2]")
        return [_coerce(part.strip(), item, key) for part in text[1:-1].split(",") if part.strip()]
    try:
        if hint is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        return hint(text)
    except ValueError:
        raise UserError(f"--set {key}={text}: expected a value of type {hint.__name__}") from None


def apply_override(cfg: Config, assignment: str) -> None:
    """Applies one `a.b=value` override in place."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"--set {assignment!r}: expected key=value, for example train.steps=100")
    if key in RENAMED:
        print(f"agx: note: {key} is now {RENAMED[key]}; the old name still works, for now", file=sys.stderr)
        key = RENAMED[key]
    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(node)}
        if part not in names:
            where = ".".join(parts[:depth]) or "the config"
            raise UserError(f"unknown config key '{key}': {where} has {', '.join(sorted(names))}")
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                raise UserError(f"config key '{key}' is a section; set one of its fields")
            hint = typing.get_type_hints(type(node))[part]
            setattr(node, part, _coerce(text, hint, key))
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise UserError(f"unknown config key '{key}': '{part}' is not a section")


# The checkout's experiments/, then the current directory's (for a non-editable install).
EXPERIMENTS_DIRS = [Path(__file__).resolve().parent.parent / "experiments", Path("experiments")]


def experiment_names() -> list[str]:
    return sorted({p.stem for d in EXPERIMENTS_DIRS for p in d.glob("*.py") if not p.stem.startswith("_")})


@contextlib.contextmanager
def _experiment_errors(path: Path):
    """A mistake in a hand-written experiment file is one line, `file:line: error`, not a traceback:
    a syntax error where Python found it, anything else at the file's deepest line in the traceback."""
    try:
        yield
    except UserError:
        raise
    except SyntaxError as e:
        raise UserError(f"{e.filename}:{e.lineno}: {type(e).__name__}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - whatever the file's own code raised
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__)
                 if Path(frame.filename).resolve() == path.resolve()]
        where = f"{path}:{lines[-1]}" if lines else str(path)
        raise UserError(f"{where}: {type(e).__name__}: {e}") from None


def load_experiment(name_or_path: str, overrides: list[str] = ()) -> Config:
    """Loads `experiments/NAME.py` (or a path to such a module), calls its `config()`, applies overrides."""
    path = Path(name_or_path)
    if path.suffix != ".py":
        path = next((d / f"{name_or_path}.py" for d in EXPERIMENTS_DIRS if (d / f"{name_or_path}.py").is_file()), path)
    if not path.is_file():
        raise UserError(f"unknown experiment '{name_or_path}': known are {', '.join(experiment_names())}, "
                        "or give a path to a .py file")
    spec = importlib.util.spec_from_file_location(f"agx_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with _experiment_errors(path):
        spec.loader.exec_module(module)
        if not callable(getattr(module, "config", None)):
            raise UserError(f"{path}: defines no config() function")
        cfg = module.config()
    if not isinstance(cfg, Config):
        raise UserError(f"experiment {path}: config() returned {type(cfg).__name__}, not agx.config.Config")
    return with_overrides(cfg, overrides)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with the `--set` assignments applied, checked, and refused where one has no effect."""
    for assignment in overrides:
        apply_override(cfg, assignment)
    cfg.validate()
    refuse_unused(cfg, overridden_keys(overrides))
    return cfg


def overridden_keys(overrides: list[str]) -> list[str]:
    """The keys `--set` assignments name, under their current names."""
    return [RENAMED.get(a.partition("=")[0], a.partition("=")[0]) for a in overrides]


# Settings that do nothing in some runs, and why: given on the command line with a value other than
# the default, such a setting is refused, for its user meant it to change something.
NO_EFFECT = [
    (("data.tokenizer", "data.eod_token"), lambda c: c.data.paths is None,
     "the built-in corpus brings its own tokenizer (these are for data.paths)"),
    (("eval.batches",), lambda c: c.eval.every == 0, "eval.every=0: no evaluation runs"),
    (("pipeline.schedule", "pipeline.microbatches", "pipeline.repeats"), lambda c: c.mesh.pipeline == 1,
     "mesh.pipeline=1: there are no pipeline stages"),
    (("mesh.sequence_parallel",), lambda c: c.mesh.tensor == 1, "mesh.tensor=1: there is no tensor axis to split over"),
    (("checkpoint.restore_step", "checkpoint.force", "checkpoint.read_retries", "checkpoint.retry_wait_s"),
     lambda c: not c.checkpoint.resume,
     "checkpoint.resume=false: nothing is restored"),
    (("model.attention_block",), lambda c: c.model.attention == "cudnn", "cuDNN's attention blocks on its own"),
    (("model.rope_theta",), lambda c: c.model.position != "rope", "rotary positions only (model.position=rope)"),
    (("train.profile_steps",), lambda c: c.train.profile_steps[0] > c.train.steps,
     "the run ends at train.steps, before the first step to profile"),
    (("train.fault_nan_steps",), lambda c: min(c.train.fault_nan_steps, default=0) > c.train.steps,
     "the run ends at train.steps, before those steps"),
]


def refuse_unused(cfg: Config, keys: list[str]) -> None:
    """A UserError for the first of `keys` (given explicitly) that has no effect in this run."""
    for names, idle, why in NO_EFFECT:
        for key in (k for k in keys if k in names):
            section, field_name = key.split(".")
            value = getattr(getattr(cfg, section), field_name)
            if value != getattr(type(getattr(cfg, section))(), field_name) and idle(cfg):
                raise UserError(f"--set {key}={value} has no effect in this run: {why}")
