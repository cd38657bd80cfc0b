"""KV-cache sampling: greedy decode equals recomputing the whole sequence, sharded sampling equals
one device, top-k/top-p keep exactly the tokens they should, and `agx.generate` as a user runs it."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from conftest import env_for, llama_tiny_config

from agx.config import MeshConfig
from agx.interop.saved import OrbaxParams, load_params
from agx.generate import main as generate_main
from agx.models.gpt import GPT
from agx.parallel.mesh import build_mesh
from agx.models.sampling import Sampler, SamplingOptions, choose_tokens
from agx.training.state import plan_params

# Different lengths, so the batch is right-padded and each sequence decodes from its own position.
PROMPTS = [[5, 17, 300, 41], [9], [1000, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42, 43]]


def sample(trained, mesh_cfg: MeshConfig, devices, opts: SamplingOptions, prompts=PROMPTS):
    source = OrbaxParams(trained)
    cfg = source.cfg
    cfg.mesh = mesh_cfg
    mesh = build_mesh(cfg.mesh, devices)
    abstract, shardings = plan_params(cfg, mesh)
    params = load_params(source, abstract, shardings)
    sampler = Sampler(cfg, mesh, shardings, len(prompts), max(map(len, prompts)), opts, eod=None)
    return [t.tolist() for t in sampler(params, [np.array(p) for p in prompts])], params, cfg


def params_export(cfg, folder):
    """A params export of `cfg`'s model freshly initialised with std 0.1: its greedy choices vary with
    the context (8 steps of training leave a model that repeats one token)."""
    import orbax.checkpoint as ocp

    cfg.model.init_std = 0.1
    boxed = GPT(cfg.model).init(jax.random.key(1), jnp.zeros((1, cfg.model.seq_len), jnp.int32))["params"]
    params = nn.meta.unbox(boxed)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save((folder / "params").absolute(), args=ocp.args.StandardSave({"params": params}))
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    return folder


@pytest.fixture(scope="module")
def lively(trained, tmp_path_factory):
    return params_export(OrbaxParams(trained).cfg, tmp_path_factory.mktemp("lively"))


@pytest.fixture(scope="module")
def lively_llama(tmp_path_factory):
    """Rotary positions and 8 query heads on 2 KV heads."""
    return params_export(llama_tiny_config(), tmp_path_factory.mktemp("lively_llama"))


ARCHITECTURES = ["lively", "lively_llama"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_kv_cache_decode_equals_recomputing_the_whole_sequence(arch, request):
    lively = request.getfixturevalue(arch)
    opts = SamplingOptions(max_new_tokens=12, temperature=0)
    cached, params, cfg = sample(lively, MeshConfig(data=1), jax.devices()[:1], opts)
    model = GPT(cfg.model)
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    length = max(map(len, PROMPTS)) + opts.max_new_tokens  # one compiled length: causal, so what
    for prompt, new in zip(PROMPTS, cached):                # follows a position changes nothing there
        sequence = list(prompt)
        for _ in range(opts.max_new_tokens):  # the whole sequence again for every token
            logits = forward(jnp.asarray([sequence + [0] * (length - len(sequence))]))[0, len(sequence) - 1]
            sequence.append(int(jnp.argmax(logits[: cfg.model.vocab_size])))
        assert new == sequence[len(prompt):]
    assert len({tuple(t) for t in cached}) == len(PROMPTS) and len(set(sum(cached, []))) > 6  # not one repeated token


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("mesh", [MeshConfig(data=1, tensor=8), MeshConfig(data=1, fsdp=4, tensor=2, zero_stage=3)])
def test_sampling_sharded_over_8_devices_equals_one_device(arch, mesh, request):
    lively = request.getfixturevalue(arch)
    for opts in [SamplingOptions(max_new_tokens=10, temperature=0),
                 SamplingOptions(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=3)]:
        one, _, _ = sample(lively, MeshConfig(data=1), jax.devices()[:1], opts)
        sharded, params, _ = sample(lively, mesh, jax.devices(), opts)
        assert sharded == one
    fc = params["layers"]["fc"]["kernel"]
    assert fc.sharding.shard_shape(fc.shape) != fc.shape  # the weights really were split


def test_grouped_query_attention_caches_only_the_kv_heads():
    """The cache shrinks by heads/kv_heads, in its shape and in the compiled program's memory."""
    def sampler(kv_heads):
        cfg = llama_tiny_config(data=1)
        cfg.model.num_kv_heads = kv_heads
        mesh = build_mesh(cfg.mesh, jax.devices()[:1])
        abstract, shardings = plan_params(cfg, mesh)
        opts = SamplingOptions(max_new_tokens=28, temperature=0)
        return Sampler(cfg, mesh, shardings, 8, 4, opts, eod=None).compile(abstract)

    heads = llama_tiny_config().model.num_heads
    multi_head, grouped = sampler(heads), sampler(2)
    L, B, K, S, Q = grouped.cache_shape()
    assert multi_head.cache_shape() == (L, B, heads, S, Q) and K == 2
    saved = 2 * L * B * (heads - K) * S * Q * 4  # keys and values, float32
    temp = lambda s: s._compiled.memory_analysis().temp_size_in_bytes
    assert temp(multi_head) - temp(grouped) >= saved


def test_temperature_zero_is_deterministic_and_the_seed_drives_sampling(lively):
    one = jax.devices()[:1]
    greedy = [sample(lively, MeshConfig(data=1), one, SamplingOptions(8, temperature=0, seed=s))[0] for s in (0, 1)]
    assert greedy[0] == greedy[1]
    hot = [sample(lively, MeshConfig(data=1), one, SamplingOptions(8, temperature=1.5, seed=s))[0] for s in (0, 0, 1)]
    assert hot[0] == hot[1] != hot[2]


def test_top_k_and_top_p_keep_exactly_the_most_likely_tokens():
    probs = np.array([0.05, 0.4, 0.25, 0.2, 0.1])
    logits_1xV = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    rngs = jax.random.split(jax.random.key(0), 2000)

    def drawn(**options):
        opts = SamplingOptions(temperature=1.0, **options)
        return set(np.asarray(jax.vmap(lambda r: choose_tokens(logits_1xV, r, 5, opts)[0])(rngs)).tolist())

    order = list(np.argsort(-probs))
    for k in (1, 2, 3):
        assert drawn(top_k=k) == set(order[:k])
    for p in (0.3, 0.6, 0.7, 0.9, 1.0):  # the smallest prefix of the ranking whose mass reaches p
        mass = np.cumsum(probs[order])
        assert drawn(top_p=p) == set(order[: int(np.searchsorted(mass, p - 1e-9)) + 1]), p
    padded = jnp.concatenate([logits_1xV, jnp.full((1, 3), 10.0)], axis=1)  # vocabulary padding never wins
    assert int(choose_tokens(padded, rngs[0], 5, SamplingOptions(temperature=0))[0]) == 1


def test_generate_cli_samples_tensor_sharded_and_refuses_a_prompt_longer_than_the_context(trained, capsys):
    result = subprocess.run([sys.executable, "-m", "agx.generate", "--checkpoint", str(trained), "--prompt", "def f(x):",
                             "--prompt", "import os", "--temperature", "0", "--max-new-tokens", "6", "--ignore-eod",
                             "--json", "--set", "mesh.data=1", "--set", "mesh.fsdp=1", "--set", "mesh.tensor=8"],
                            capture_output=True, text=True, env=env_for(8), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == ["def f(x):", "import os"]
    from agx.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(OrbaxParams(trained).tokenizer_file())
    expected, _, _ = sample(trained, MeshConfig(data=1), jax.devices()[:1], SamplingOptions(6, temperature=0),
                            [t.tolist() for t in tokenizer.encode(["def f(x):", "import os"])])
    assert [r["tokens"] for r in lines] == expected
    assert [r["completion"] for r in lines] == [tokenizer.decode(t) for t in expected]

    code = generate_main(["--checkpoint", str(trained), "--prompt", "x = 1\n" * 40])  # > 32 tokens of context
    err = capsys.readouterr().err
    assert code == 2 and "longer than the model's context of 32" in err and "Traceback" not in err, err


def test_generate_samples_a_hugging_face_export_as_it_samples_the_checkpoint(trained, tmp_path):
    from agx.generate import generate

    exported = subprocess.run([sys.executable, "-m", "agx.export", "--checkpoint", str(trained), "--format", "hf",
                               "--output", str(tmp_path / "hf")], capture_output=True, text=True, env=env_for(1))
    assert exported.returncode == 0, exported.stderr[-3000:]
    opts = SamplingOptions(max_new_tokens=6, temperature=0.8, top_k=20, seed=5, stop_at_eod=False)
    prompts = ["def f(x):", "import os"]
    texts, tokens, _ = generate(trained, prompts, opts, ["mesh.data=-1", "mesh.fsdp=1"], None)
    hf_texts, hf_tokens, _ = generate(tmp_path / "hf", prompts, opts, [], None)
    assert [t.tolist() for t in hf_tokens] == [t.tolist() for t in tokens] and hf_texts == texts
