"""`python -m agx.train` as a user runs it: real processes, real output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_ENV, TINY, agx_train, env_for

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_of_the_trillion_parameter_model_allocates_nothing():
    result = agx_train("--experiment", "gpt3_1t", "--dry-run", "--set", "mesh.tensor=8", "--set", "mesh.fsdp=1")
    assert result.returncode == 0, result.stderr
    assert "model.num_layers = 128" in result.stdout
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["params"] == pytest.approx(1.0e12, rel=0.01)
    assert plan["mesh"] == {"pipeline": 1, "data": 1, "fsdp": 1, "context": 1, "tensor": 8}
    assert plan["flops_per_token"] > 6 * plan["params"]
    assert "model.attention = 'auto'" in result.stdout  # what was asked, then what this machine runs
    assert plan["attention"] == {"kind": "xla", "block": 64, "why": "auto on cpu: not cuDNN's, for cpu is not an "
                                                                   "NVIDIA GPU"}
    # 4 bytes per fp32 parameter, split 8 ways by tensor parallelism (LayerNorms replicated)
    assert plan["param_bytes_per_device"] == pytest.approx(4 * plan["params"] / 8, rel=0.01)


@pytest.mark.parametrize("args,message", [
    (["--experiment", "gpt3_nope"], "unknown experiment 'gpt3_nope'"),
    (["--experiment", "gpt3_tiny", "--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["--experiment", "gpt3_tiny", "--set", "train.steps=many"], "expected a value of type int"),
    (["--experiment", "gpt3_tiny", "--set", "mesh.data=3"], "does not divide the 8 devices"),
    (["--experiment", "gpt3_tiny", "--set", "mesh.data=1", "--set", "mesh.tensor=8", "--set", "model.num_heads=4"],
     "do not divide dimension 4"),
    (["--experiment", "gpt3_tiny", "--set", "train.batch_size=12"], "not divisible by the data-parallel degree"),
    (["--experiment", "gpt3_tiny", "--set", "model.remat=some"], "model.remat='some' is not one of"),
    (["--experiment", "gpt3_tiny", "--set", "model.attention_block=48"], "must be 0 or divide model.seq_len=128"),
    (["--experiment", "gpt3_tiny", "--set", "model.attention=cudnn"], "model.attention=cudnn needs model.dtype bfloat16"),
    (["--experiment", "gpt3_tiny", "--set", "model.attention=cudnn", "model.dtype=bfloat16"],
     "model.attention=cudnn needs an NVIDIA GPU; this run is on cpu"),
    # given, but without effect in this run (agx.config.NO_EFFECT)
    (["--experiment", "gpt3_tiny", "--set", "data.tokenizer=/no/such/tokenizer.json"],
     "data.tokenizer=/no/such/tokenizer.json has no effect in this run: the built-in corpus brings its own"),
    (["--experiment", "gpt3_tiny", "--set", "eval.every=0", "eval.batches=8"], "eval.batches=8 has no effect"),
    (["--experiment", "gpt3_tiny", "--set", "pipeline.repeats=2"], "mesh.pipeline=1: there are no pipeline stages"),
    (["--experiment", "gpt3_tiny", "--set", "mesh.sequence_parallel=true"], "mesh.tensor=1: there is no tensor axis"),
    (["--experiment", "gpt3_tiny", "--set", "model.rope_theta=500000"], "rotary positions only (model.position=rope)"),
    (["--experiment", "gpt3_tiny", "--set", "train.profile_steps=[400,402]"], "before the first step to profile"),
])
def test_bad_input_gets_one_line_and_nonzero_exit(args, message):
    result = agx_train(*args, "--dry-run")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("agx: error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    # Nothing else but agx's own one-line notices (the XPU stack says once that it runs on CPU).
    assert all(line.startswith("agx: ") for line in result.stderr.splitlines()), result.stderr


WHILE_A_THREAD_PRINTS = """
import sys, threading
from agx.errors import RunError, cli_exit, whole_lines_on_stderr
half_written, error_written = threading.Event(), threading.Event()

def library_thread():  # as TensorStore's print a traceback: piece by piece
    sys.stderr.write("    self."); half_written.set(); error_written.wait(); sys.stderr.write("_check_closed()\\n")

with whole_lines_on_stderr():
    thread = threading.Thread(target=library_thread); thread.start(); half_written.wait()
    code = cli_exit(RunError("a checkpoint save failed")); error_written.set(); thread.join()
sys.exit(code)
"""


@pytest.mark.stack_independent  # Python's streams only
def test_the_error_line_stays_whole_while_a_library_thread_is_mid_line_on_stderr():
    """CI's full-disk run: agx's error line landed inside a TensorStore traceback line."""
    for unbuffered in ("1", ""):
        env = {**CLI_ENV, "PYTHONUNBUFFERED": unbuffered}
        result = subprocess.run([sys.executable, "-c", WHILE_A_THREAD_PRINTS], capture_output=True, text=True,
                                env=env, timeout=60)
        assert result.returncode == 1
        assert result.stderr.splitlines() == ["agx: error: a checkpoint save failed", "    self._check_closed()"], \
            result.stderr


def test_bad_mesh_fails_before_training_starts(tmp_path):
    result = agx_train("--experiment", "gpt3_tiny", "--set", "mesh.data=3", "--workdir", str(tmp_path))
    assert result.returncode == 2 and "agx: error: mesh pipeline=1,data=3,fsdp=1,context=1,tensor=1" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow  # a long launched run (see pyproject.toml)
def test_default_experiment_loss_falls_within_50_steps(tmp_path):
    env = {k: v for k, v in CLI_ENV.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    result = agx_train("--experiment", "gpt3_tiny", "--set", "train.steps=50", "--workdir", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "event" not in r]
    assert [r["step"] for r in records] == list(range(1, 51))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_s"} <= set(records[0])
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert first == pytest.approx(7.62, abs=0.3)  # ln(2048): uniform over the BPE vocabulary at init
    assert last < first - 1.5, (first, last)
    assert "step     50 | loss" in result.stdout
    assert ("agx: attention: agx's attention in query blocks of 64 of 128 positions (auto on cpu: not cuDNN's, for "
            "cpu is not an NVIDIA GPU)") in result.stdout
    assert "WARNING:absl" not in result.stderr, result.stderr  # nor the libraries' notices
    assert "leaked shared_memory" not in result.stderr, result.stderr  # the loader's batches in flight


def test_check_attention_computes_agx_attention_then_refuses_cudnn_on_cpu_in_one_line():
    """tools/check_attention.py gets through the fp32 and 16-bit runs of agx's attention here; cuDNN's
    is refused in one line (its numbers are checked on a GPU; see the README's Benchmark)."""
    result = subprocess.run([sys.executable, str(REPO / "tools" / "check_attention.py"), *TINY,
                             "--set", "model.dtype=bfloat16"], capture_output=True, text=True, env=env_for(8),
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == "agx: error: model.attention=cudnn needs an NVIDIA GPU; this run is on cpu"


@pytest.mark.parametrize("source,message", [
    ("from agx.config import Config\ndef config(:\n    return Config()\n", "bad.py:2: SyntaxError: "),
    ("from agx.config import Config\n\n\ndef config():\n    return Confg()\n",
     "bad.py:5: NameError: name 'Confg' is not defined"),
    ("from agx.config import Config\nCONFIG = Config()\n", "bad.py: defines no config() function"),
])
def test_a_mistake_in_an_experiment_file_is_one_line_naming_its_file_and_line(tmp_path, source, message):
    (tmp_path / "bad.py").write_text(source)
    result = agx_train("--experiment", str(tmp_path / "bad.py"), "--workdir", str(tmp_path / "run"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("agx: error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


# A file where the workdir goes, a read-only file system and a full one (tmpfs mounts in a private
# user and mount namespace, as the full-disk drill makes them).
WORKDIR_SCRIPT = r"""
set -u
train() {
  "$PYTHON" -m agx.train --experiment gpt3_tiny --workdir "$1" > /dev/null 2> "$OUT/$2.err"; echo $? > "$OUT/$2.rc"
}
touch "$ROOT/a_file"
train "$ROOT/a_file" file
mkdir "$ROOT/ro" "$ROOT/full"
mount -t tmpfs -o size=1m,ro agx-read-only "$ROOT/ro"
train "$ROOT/ro/run" read_only
mount -t tmpfs -o size=1m agx-full "$ROOT/full"
mkdir "$ROOT/full/run"
fallocate -l $(( $(df --output=avail -B1 "$ROOT/full" | tail -1) )) "$ROOT/full/filler"
train "$ROOT/full/run" full
ls -A "$ROOT/full/run" > "$OUT/full.ls"
"""


def test_a_workdir_that_is_a_file_read_only_or_full_is_refused_in_one_line_before_anything_starts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**CLI_ENV, "ROOT": str(tmp_path), "OUT": str(out), "PYTHON": sys.executable}
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", WORKDIR_SCRIPT],
                   env=env, check=True, timeout=300)
    for name, message in [("file", "is a file, not a folder"), ("read_only", "cannot be made: Read-only file system"),
                          ("full", "is not writable: No space left on device")]:
        stderr = (out / f"{name}.err").read_text()
        assert (out / f"{name}.rc").read_text().strip() == "2", stderr
        assert stderr.splitlines() == [f"agx: error: --workdir {tmp_path}/" + {
            "file": "a_file", "read_only": "ro/run", "full": "full/run"}[name] + f" {message}"], stderr
    assert (out / "full.ls").read_text() == ""  # nothing left behind
