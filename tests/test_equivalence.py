"""Every layout of 8 devices computes the same training run as one device, for the GPT-3 and the
Llama architecture."""

import dataclasses

import jax
import pytest
from conftest import ARCHITECTURES, assert_same_run, run_steps

MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "tensor8": (1, 1, 8), "2x2x2": (2, 2, 2)}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def reference(arch, corpus):
    return run_steps(ARCHITECTURES[arch](), corpus, jax.devices()[:1])


def with_mesh(arch, mesh_name, zero_stage, **kwargs):
    cfg = ARCHITECTURES[arch](**dict(zip(("data", "fsdp", "tensor"), MESHES[mesh_name])), zero_stage=zero_stage)
    for section, values in kwargs.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    return cfg


# Every ZeRO stage where `data` splits the batch. ZeRO shards over `data` alone: on fsdp8 and tensor8
# (data=1) stages 1 and 2 compile to the program of stage 0, the same HLO (stage 3 orders the axes
# of 'embed' otherwise).
@pytest.mark.parametrize("mesh,zero_stage", [(mesh, zero) for mesh in ("data8", "2x2x2") for zero in range(4)]
                         + [(mesh, zero) for mesh in ("fsdp8", "tensor8") for zero in (0, 3)])
def test_layout_matches_single_device(arch, mesh, zero_stage, corpus, reference):
    assert_same_run(run_steps(with_mesh(arch, mesh, zero_stage), corpus, jax.devices()), reference)


@pytest.mark.parametrize("mesh,zero_stage", [("data8", 2), ("fsdp8", 3), ("tensor8", 1), ("2x2x2", 0)])
def test_accumulation_and_full_remat_match_single_device(arch, mesh, zero_stage, corpus, reference):
    cfg = with_mesh(arch, mesh, zero_stage, train={"microbatches": 2}, model={"remat": "full"})
    assert_same_run(run_steps(cfg, corpus, jax.devices()), reference)


@pytest.mark.parametrize("mesh,zero_stage", [("tensor8", 3), ("2x2x2", 2)])
def test_selective_remat_with_sequence_parallel_matches_single_device(arch, mesh, zero_stage, corpus, reference):
    cfg = with_mesh(arch, mesh, zero_stage, model={"remat": "selective"}, mesh={"sequence_parallel": True})
    assert_same_run(run_steps(cfg, corpus, jax.devices()), reference)
