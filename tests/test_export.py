"""Export and import as a user runs them: a trained checkpoint to a Hugging Face GPT-2 or Llama
folder that `transformers` loads with the same logits and greedy tokens, to a params-only Orbax checkpoint, back from Hugging Face
to a workdir the trainer continues, streaming within bounded memory, and refusals of bad input."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, agx_train, env_for, sets

from agx.config import MeshConfig
from agx.export import main as export_main
from agx.interop.saved import OrbaxParams, flat, load_params
from agx.models.gpt import GPT
from agx.parallel.mesh import build_mesh
from agx.training.state import plan_params

PROMPTS = ["def main():\n    return 0\n", "import os\nimport sys\n\nclass Path(", "    for i in range(10):"]


def export(*args, devices=1):
    result = subprocess.run([sys.executable, "-m", "agx.export", *map(str, args)], capture_output=True, text=True,
                            env=env_for(devices), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def agx_params(checkpoint, dtype=None):
    """The checkpoint's parameters on one device, and its config."""
    source = OrbaxParams(checkpoint)
    abstract, shardings = plan_params(source.cfg, build_mesh(MeshConfig(data=1), jax.devices()[:1]))
    return load_params(source, abstract, shardings, dtype), source.cfg


def safetensors_of(folder) -> dict:
    from safetensors.numpy import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same_tensors(first_folder, second_folder):
    first, second = safetensors_of(first_folder), safetensors_of(second_folder)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype and np.array_equal(first[name], second[name]), name
    return first


def assert_same_params_but_padding(original: dict, read, vocab_size: int):
    """`read(name)` equals every original parameter; the vocabulary padding, which no export holds,
    comes back as zeros."""
    for name, a in original.items():
        b = read(name)
        if name in ("wte.embedding", "lm_head.kernel"):  # vocabulary on axis 0 and 1
            a, b = (np.moveaxis(x, 1, 0) if name == "lm_head.kernel" else x for x in (a, b))
            assert np.array_equal(a[:vocab_size], b[:vocab_size]) and not np.any(b[vocab_size:]), name
        else:
            assert np.array_equal(a, b), name


def assert_greedy_tokens_match(hf, cfg, params, prompts):
    """transformers' own greedy `generate` (its KV cache) gives agx's greedy tokens (agx's KV cache)."""
    import torch

    from agx.models.sampling import Sampler, SamplingOptions

    mesh = build_mesh(MeshConfig(data=1), jax.devices()[:1])
    _, shardings = plan_params(cfg, mesh)
    sampler = Sampler(cfg, mesh, shardings, len(prompts), max(map(len, prompts)),
                      SamplingOptions(max_new_tokens=8, temperature=0, stop_at_eod=False), eod=None)
    for prompt, ours in zip(prompts, sampler(params, prompts)):
        ids = torch.tensor([prompt.tolist()])
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)[0, len(prompt):]
        assert ours.tolist() == theirs.tolist()


def test_hf_export_loads_in_transformers_with_the_same_logits(trained, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    export("--checkpoint", trained, "--format", "hf", "--output", tmp_path / "fp32", "--max-shard-size", "200KB")
    export("--checkpoint", trained, "--format", "hf", "--output", tmp_path / "bf16", "--dtype", "bf16")
    assert len(list((tmp_path / "fp32").glob("model-*-of-*.safetensors"))) > 1  # sharded by size, with an index
    assert (tmp_path / "fp32" / "model.safetensors.index.json").is_file()
    assert [p.name for p in (tmp_path / "bf16").glob("*.safetensors")] == ["model.safetensors"]

    params, cfg = agx_params(trained)
    V = cfg.model.vocab_size
    model = GPT(cfg.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "fp32")
    from agx.data.tokenizer import Tokenizer

    ours_tok = Tokenizer(OrbaxParams(trained).tokenizer_file())
    assert tokenizer.eos_token_id == ours_tok.eod
    for dtype, folder, tolerance in [("float32", "fp32", 2e-5), ("bfloat16", "bf16", 2e-5)]:
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / folder, torch_dtype=torch.float32).eval()
        # bf16 export: transformers holds the rounded weights; agx is given the same rounding
        ours = params if dtype == "float32" else jax.tree_util.tree_map(
            lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params)
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            assert ids == ours_tok.encode([prompt])[0].tolist()
            with torch.no_grad():
                theirs = hf(torch.tensor([ids])).logits[0].numpy()
            mine = np.asarray(model.apply({"params": ours}, jnp.asarray([ids])))[0, :, :V]
            np.testing.assert_allclose(mine, theirs, atol=tolerance * np.abs(theirs).max(), rtol=0)
            assert (mine[-1].argmax() == theirs[-1].argmax())

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "fp32", torch_dtype=torch.float32).eval()
    assert_greedy_tokens_match(hf, cfg, params, [ours_tok.encode([p])[0] for p in PROMPTS])
    assert_imports_alone_and_trains_on(hf, tmp_path / "fp32", trained, tmp_path)


def assert_imports_alone_and_trains_on(hf, tokenizer_from: Path, trained: Path, tmp_path) -> None:
    """`hf`, saved by transformers itself, imports with no --experiment (its shape read from its
    config.json, the recipe agx's defaults), and trains on from its weights, not from a fresh init."""
    folder, workdir = tmp_path / "saved-by-transformers", tmp_path / "imported-alone"
    hf.save_pretrained(folder, safe_serialization=True)
    shutil.copy2(tokenizer_from / "tokenizer.json", folder / "tokenizer.json")
    result = export("--from-hf", folder, "--output", workdir, devices=8)
    assert f"python -m agx.train --experiment {workdir / 'experiment.py'} --workdir {workdir}" in result.stdout
    continued = agx_train("--experiment", str(workdir / "experiment.py"), "--workdir", str(workdir),
                          *sets("train.steps=1", "eval.every=0", "data.workers=0"), env=env_for(8))
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "resumed from checkpoint step 0" in continued.stdout
    assert step_losses(workdir)[1] < step_losses(trained)[1] - 0.3  # batch 0 again, now from trained weights


def test_export_import_export_is_exact_and_the_trainer_continues_the_import(trained, tmp_path):
    export("--checkpoint", trained, "--format", "hf", "--output", tmp_path / "hf")
    # imported into the experiment the trainer then runs: gpt3_tiny with TINY's settings
    result = export("--from-hf", tmp_path / "hf", "--output", tmp_path / "imported", *TINY, devices=8)
    assert "continue training with" in result.stdout
    export("--checkpoint", tmp_path / "imported", "--format", "hf", "--output", tmp_path / "again")
    assert_same_tensors(tmp_path / "hf", tmp_path / "again")

    original, _ = agx_params(trained)
    imported, cfg = agx_params(tmp_path / "imported")
    assert_same_params_but_padding(flat(original), flat(imported).get, cfg.model.vocab_size)

    continued = agx_train(*TINY, "--workdir", str(tmp_path / "imported"), *sets("train.steps=2", "mesh.data=8"),
                          env=env_for(8))
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "resumed from checkpoint step 0" in continued.stdout and "no data position" in continued.stdout
    # Step 1 of both runs sees batch 0: from the imported weights its loss is the trained one, not a fresh init's
    first, imported_first = (step_losses(w)[1] for w in (trained, tmp_path / "imported"))
    assert imported_first < first - 0.3 and imported_first < step_losses(trained)[8] + 0.1


# The Llama architecture at TINY's shapes: 8 query heads on 2 KV heads, SwiGLU 176 wide, untied head
LLAMA_TINY = ["--experiment", "llama_tiny"] + [arg for setting in [
    "model.num_layers=2", "model.d_model=64", "model.ffn_size=176", "model.seq_len=32", "model.scan_unroll=1",
    "model.vocab_multiple=384",  # 2048 padded to 2304: the export cuts the padding
    "train.batch_size=16", "train.log_every=100", "eval.every=0"] for arg in ("--set", setting)]


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    """llama_tiny trained 8 steps with its KV heads split over tensor=2 (and fsdp=4)."""
    workdir = tmp_path_factory.mktemp("trained_llama")
    result = agx_train(*LLAMA_TINY, "--workdir", str(workdir), *sets(
        "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "train.steps=8", "checkpoint.every=8", "optim.lr=3e-3",
        "optim.warmup_steps=2"), env=env_for(8))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_llama_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(trained_llama, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    result = export("--checkpoint", trained_llama, "--format", "hf", "--output", tmp_path / "hf",
                    "--max-shard-size", "300KB")
    assert "as hf llama" in result.stdout and len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["num_key_value_heads"], config["tie_word_embeddings"]) == \
        (["LlamaForCausalLM"], 2, False)

    params, cfg = agx_params(trained_llama)
    V = cfg.model.vocab_size
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert hf.model.layers[0].self_attn.k_proj.weight.shape == (2 * cfg.model.head_dim, cfg.model.d_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = GPT(cfg.model)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            theirs = hf(torch.tensor([ids])).logits[0].numpy()
        mine = np.asarray(model.apply({"params": params}, jnp.asarray([ids])))[0, :, :V]
        np.testing.assert_allclose(mine, theirs, atol=2e-5 * np.abs(theirs).max(), rtol=0)

    assert_greedy_tokens_match(hf, cfg, params, [np.asarray(tokenizer(p)["input_ids"]) for p in PROMPTS])
    assert_imports_alone_and_trains_on(hf, tmp_path / "hf", trained_llama, tmp_path)


def test_llama_export_import_export_is_exact(trained_llama, tmp_path):
    export("--checkpoint", trained_llama, "--format", "hf", "--output", tmp_path / "hf")
    export("--from-hf", tmp_path / "hf", "--output", tmp_path / "imported", *LLAMA_TINY, devices=8)
    export("--checkpoint", tmp_path / "imported", "--format", "hf", "--output", tmp_path / "again")
    assert "lm_head.weight" in assert_same_tensors(tmp_path / "hf", tmp_path / "again")

    original, _ = agx_params(trained_llama)
    imported, cfg = agx_params(tmp_path / "imported")
    assert_same_params_but_padding(flat(original), flat(imported).get, cfg.model.vocab_size)


@pytest.mark.parametrize("variant", [
    {"num_kv_heads": None, "bias": True, "tie_embeddings": True},  # fused qkv, biases, tied head
    {"num_kv_heads": 1, "rope_theta": 50000.0},  # multi-query
], ids=["mha-bias-tied", "mqa"])
def test_llama_variants_export_to_transformers_and_import_back_exactly(variant, tmp_path):
    """Randomly initialised (std 0.1, biases and norms too), so that every piece shows in the logits."""
    import dataclasses

    import orbax.checkpoint as ocp
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conftest import llama_tiny_config

    cfg = llama_tiny_config()
    cfg.model = dataclasses.replace(cfg.model, vocab_multiple=384, **variant)
    abstract, _ = plan_params(cfg, build_mesh(MeshConfig(data=1), jax.devices()[:1]))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: 0.1 * rng.standard_normal(a.shape, np.float32), abstract)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save((tmp_path / "agx" / "params").absolute(), args=ocp.args.StandardSave({"params": params}))
    (tmp_path / "agx" / "config.json").write_text(json.dumps(cfg.to_dict()))

    export("--checkpoint", tmp_path / "agx", "--format", "hf", "--output", tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ids = [5, 17, 300, 41, 2000, 9, 9, 1]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    mine = np.asarray(GPT(cfg.model).apply({"params": params}, jnp.asarray([ids])))[0, :, :cfg.model.vocab_size]
    np.testing.assert_allclose(mine, theirs, atol=2e-5 * np.abs(theirs).max(), rtol=0)

    from agx.interop.hf_folder import HFParams

    source = HFParams(tmp_path / "hf")
    assert {k: v for k, v in source.model_shape.items() if k in variant} == variant
    source.bind(cfg.model, {name: a.shape for name, a in flat(abstract).items()})
    original = flat(params)
    assert_same_params_but_padding(
        original, lambda name: source.read(name, tuple(slice(0, n) for n in original[name].shape)),
        cfg.model.vocab_size)


def step_losses(workdir) -> dict[int, float]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "event" not in r}


def test_orbax_export_holds_only_the_params_in_the_chosen_dtype(trained, tmp_path):
    import orbax.checkpoint as ocp

    export("--checkpoint", trained, "--format", "orbax", "--output", tmp_path / "out", "--dtype", "bf16", devices=8)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"params", "config.json", "tokenizer.json"}
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore((out / "params").absolute())  # a plain Orbax user's view
    assert set(restored) == {"params"}
    original, _ = agx_params(trained)
    for name, a in flat(original).items():
        b = flat(restored["params"])[name]
        assert b.dtype == jnp.bfloat16 and np.array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b)), name
    assert json.loads((out / "config.json").read_text())["model"]["d_model"] == 64


def test_hf_export_memory_is_bounded_by_the_largest_tensor_not_the_model(trained, tmp_path):
    """A 109M-parameter (437 MB) checkpoint exported in a process whose peak memory is measured."""
    import orbax.checkpoint as ocp

    from agx.checkpoint import chunked
    from agx.config import Config, ModelConfig

    cfg = Config(name="memory", model=ModelConfig(num_layers=8, d_model=1024, num_heads=16, seq_len=128,
                                                  vocab_size=8192))
    cfg.data.tokenizer = str(OrbaxParams(trained).tokenizer_file())
    abstract, _ = plan_params(cfg, build_mesh(MeshConfig(data=1), jax.devices()[:1]))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape, np.float32), abstract)
    model_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
    largest = params["wte"]["embedding"].nbytes  # 32 MB; one layer's MLP matrix is 16 MB
    source = tmp_path / "big"
    tree = {"params": params}
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save((source / "params").absolute(), args=ocp.args.StandardSave(tree, save_args=chunked(tree)))
    (source / "config.json").write_text(json.dumps(cfg.to_dict()))
    del params, tree

    # VmHWM, not ru_maxrss: the latter keeps the peak of the forked pytest process across exec
    measure = """
import json, os, sys
import jax, ml_dtypes, tensorstore, orbax.checkpoint
import agx.interop.hf_folder, agx.interop.hf_gpt2, agx.interop.hf_llama, agx.interop.saved, agx.training.state
from agx.export import main
jax.devices()
baseline = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
code = main(sys.argv[1:])
peak = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print(json.dumps({"code": code, "baseline": baseline, "peak": peak}))
"""
    result = subprocess.run([sys.executable, "-c", measure, "--checkpoint", str(source), "--format", "hf",
                             "--output", str(tmp_path / "hf")], capture_output=True, text=True, env=env_for(1),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] == 0
    grown = report["peak"] - report["baseline"]
    print(f"model {model_bytes / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, "
          f"export peak above baseline {grown / 2**20:.0f} MiB")
    assert grown < 4 * largest and grown < model_bytes / 3, (grown, largest, model_bytes)
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > model_bytes - 2**20 * 1  # everything written


# --- bad input: one line, exit 2, nothing written ------------------------------------------------

def error_of(capsys, main, *args) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("agx: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_checkpoint_of_another_architecture_is_refused(trained, tmp_path, capsys):
    import orbax.checkpoint as ocp

    other = tmp_path / "llama"
    tree = {"params": {"tok_embeddings": np.zeros((2048, 64), np.float32),
                       "layers": {"attention": {"wq": np.zeros((2, 64, 64), np.float32)}}}}
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save((other / "params").absolute(), args=ocp.args.StandardSave(tree))
    saved = OrbaxParams(trained).cfg.to_dict()
    (other / "config.json").write_text(json.dumps(saved))
    assert "not a checkpoint of agx's GPT" in error_of(capsys, export_main, "--checkpoint", other, "--format", "hf",
                                                         "--output", tmp_path / "out")
    assert "not an agx checkpoint" in error_of(capsys, export_main, "--checkpoint", tmp_path, "--format", "hf",
                                               "--output", tmp_path / "out")
    changed = shutil.copytree(trained / "checkpoints" / "8", tmp_path / "changed")
    (changed / "shapes" / "metadata").write_text((changed / "shapes" / "metadata").read_text().replace("64", "65"))
    assert "does not match its checksums (content differs from its checksum: shapes/metadata)" in error_of(
        capsys, export_main, "--checkpoint", changed, "--format", "hf", "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_folders_of_other_kinds_incomplete_or_only_pickled_are_refused(trained, tmp_path, capsys):
    bert, llama = tmp_path / "bert", tmp_path / "llama"
    for folder, config in [(bert, {"model_type": "bert"}), (llama, {"model_type": "llama", "hidden_size": 64})]:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    assert "agx imports gpt2 and llama" in error_of(capsys, export_main, "--from-hf", bert, "--experiment",
                                                    "gpt3_tiny", "--output", tmp_path / "out")
    assert "has no 'num_attention_heads'" in error_of(capsys, export_main, "--from-hf", llama, "--experiment",
                                                      "llama_tiny", "--output", tmp_path / "out")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    export("--checkpoint", trained, "--format", "hf", "--output", tmp_path / "hf")
    (pickled / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    marker = tmp_path / "code-ran"

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    line = error_of(capsys, export_main, "--from-hf", pickled, "--experiment", "gpt3_tiny", "--output", tmp_path / "out")
    assert "never loads" in line and "safe_serialization=True" in line
    assert not marker.exists() and not (tmp_path / "out").exists()

    line = error_of(capsys, export_main, "--from-hf", tmp_path / "hf", "--experiment", "gpt3_tiny", "--set",
                    "model.num_layers=4", "model.norm_eps=0.00001", "--output", tmp_path / "out")
    assert line.endswith("hf: --set model.num_layers=4, but its config.json has 2")  # 2 layers; ε 1e-05 agrees


def test_a_non_empty_output_is_refused_unless_forced(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--force" in error_of(capsys, export_main, "--checkpoint", trained, "--format", "hf", "--output", out)
    assert (out / "keep.txt").read_text() == "mine"
    export("--checkpoint", trained, "--format", "hf", "--output", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left beside it
