"""The Grain loader: per-process rows that together make each global batch, and exact resume."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import batch, env_for, tiny_config

from agx.data.loader import BatchLoader, LoadRows, device_rows
from agx.data.dataset import make_samples
from agx.parallel.mesh import build_mesh
from agx.training.step import batch_sharding

B, T = 16, 32


class SampleIds:
    """Sample i is [i, i, ...]: a batch shows which samples it holds."""

    def __getitem__(self, i):
        return np.full(T + 1, i, np.int32)


@pytest.mark.parametrize("mesh,processes", [((8, 1, 1), 8), ((2, 2, 2), 4), ((1, 4, 2), 2), ((1, 1, 8), 2)])
def test_process_slices_make_up_every_global_batch_once(mesh, processes):
    cfg = tiny_config(**dict(zip(("data", "fsdp", "tensor"), mesh)))
    sharding = batch_sharding(build_mesh(cfg.mesh, jax.devices()))
    devices = sharding.mesh.devices.reshape(processes, -1)  # as jax.distributed groups them: in mesh order
    steps = 5  # an epoch of 80 samples
    loaded = []
    for group in devices:
        rows = device_rows(sharding, (B, T + 1), list(group))
        load = LoadRows(SampleIds(), B, rows)
        for step in range(steps):
            ids = load(step)[:, 0]
            assert ids.tolist() == [step * B + r for r in rows]
            loaded.append(set(ids.tolist()))
    per_step = [set().union(*loaded[s::steps]) for s in range(steps)]
    assert [sorted(s) for s in per_step] == [list(range(s * B, (s + 1) * B)) for s in range(steps)]
    # Each process loads only its share: the data-parallel groups split the batch without overlap.
    data_parallel = mesh[0] * mesh[1]
    assert all(len(ids) == B // min(data_parallel, processes) for ids in loaded)


@pytest.fixture(scope="module")
def samples():
    return make_samples(tiny_config(), num_samples=40 * B)


def test_global_array_on_eight_devices_is_the_global_batch(samples):
    cfg = tiny_config(data=4, tensor=2)
    sharding = batch_sharding(build_mesh(cfg.mesh, jax.devices()))
    loader = BatchLoader(samples, B, 3, sharding, T, workers=0)
    for step in range(3):
        array = next(loader)
        assert array.sharding == sharding and array.shape == (B, T + 1)
        np.testing.assert_array_equal(np.asarray(array), batch(samples, step, B))
    with pytest.raises(StopIteration):
        next(loader)


def test_restored_iterator_yields_the_next_batches_with_worker_processes(samples):
    sharding = batch_sharding(build_mesh(tiny_config(data=8).mesh, jax.devices()))
    uninterrupted = BatchLoader(samples, B, 30, sharding, T, workers=2)
    expected = [uninterrupted.next_local() for _ in range(23)]
    uninterrupted.close()

    first = BatchLoader(samples, B, 30, sharding, T, workers=2)
    for _ in range(3):
        first.next_local()
    state = first.get_state()
    first.close()
    resumed = BatchLoader(samples, B, 30, sharding, T, workers=2)
    resumed.set_state(state)
    for want in expected[3:]:
        np.testing.assert_array_equal(resumed.next_local(), want)
    resumed.close()
    np.testing.assert_array_equal(expected[5], batch(samples, 5, B))  # and the stream is the sample order


LOADER_TO_ITS_END_AND_CLOSED_EARLY = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from agx.data.loader import BatchLoader
from test_loader import SampleIds
if __name__ == "__main__":  # the workers are spawned, and import this module
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), PartitionSpec())
    for read in (10, 3):
        loader = BatchLoader(SampleIds(), 16, 10, sharding, 32, workers=1)
        batches = [loader.next_local() for _ in range(read)]
        loader.close()
    print("read", batches[-1][0, 0])
"""


def test_a_loader_read_to_its_end_or_closed_early_leaves_no_shared_memory_behind(tmp_path):
    """What multiprocessing's resource tracker warns of at exit ("leaked shared_memory objects"):
    it did so after most runs, for a batch in flight at close or one freed by Grain too early."""
    script = tmp_path / "loader_script.py"
    script.write_text(LOADER_TO_ITS_END_AND_CLOSED_EARLY)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**env_for(1), "PYTHONPATH": str(Path(__file__).parent)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["read", "32"]  # the third batch: samples 32-47
    assert "leaked" not in result.stderr, result.stderr
