"""Machines to plan for: devices per node, memory and peak per device, and link bandwidths.

Figures are vendor data-sheet values (one direction, per device). Where a fabric figure is not
published per device it is the node's NIC bandwidth shared by its devices. A `--system FILE.json`
with the same fields describes any other machine.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from agx.errors import UserError

PLATFORMS = ("cuda", "rocm", "xpu", "cpu")


@dataclass(frozen=True)
class System:
    name: str
    devices_per_node: int
    memory_gib: float  # per device
    peak_tflops: float  # dense bf16 per device
    intra_node_gbs: float  # GB/s one direction, per device, to the devices of its node
    inter_node_gbs: float  # GB/s one direction, per device, to other nodes
    platform: str = "cuda"  # its devices' backend ('cuda', 'xpu', 'cpu'): which attention auto takes there
    compute_capability: str | None = None  # an NVIDIA GPU's ("9.0": Hopper), for cuDNN's head sizes

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


SYSTEMS = {
    # 6 Max 1550 GPUs = 12 tiles of 64 GiB (ZE_FLAT_DEVICE_HIERARCHY=FLAT); 8 Slingshot-11 NICs of
    # 25 GB/s per node; Xe Link between GPUs (an estimate: no per-tile figure is published).
    "aurora": System("aurora", 12, 64, 419.4, 50.0, 8 * 25 / 12, "xpu"),
    # 4 A100-40GB, NVLink 3 (300 GB/s one way), 2 Slingshot-11 NICs per node.
    "polaris": System("polaris", 4, 40, 312.0, 300.0, 2 * 25 / 4, "cuda", "8.0"),
    # DGX H100: NVLink 4 (450 GB/s one way), 8 × 400 Gb/s InfiniBand.
    "h100x8": System("h100x8", 8, 80, 989.4, 450.0, 50.0, "cuda", "9.0"),
    # This project's 2-core machine as 8 simulated devices sharing 24 GB; 133 GFLOP/s measured matmul.
    "cpu": System("cpu", 8, 3, 0.133 / 8, 10.0, 10.0, "cpu"),
}


def load_system(name_or_path: str) -> System:
    if name_or_path in SYSTEMS:
        return SYSTEMS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(f"unknown system '{name_or_path}': known are {', '.join(SYSTEMS)}, or give a JSON file")
    try:
        fields = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    names = [f.name for f in dataclasses.fields(System) if f.name not in ("platform", "compute_capability")]
    missing = [n for n in names if n not in fields and n != "name"]
    if missing:
        raise UserError(f"{path}: missing system fields {', '.join(missing)} (a system has {', '.join(names)})")
    try:
        values = {n: (str if n == "name" else float)(fields.get(n, path.stem)) for n in names}
        values["devices_per_node"] = int(values["devices_per_node"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad system field value ({e})") from None
    if any(values[n] <= 0 for n in names if n != "name"):
        raise UserError(f"{path}: every system figure must be positive")
    platform = fields.get("platform", System.platform)
    if platform not in PLATFORMS:
        raise UserError(f"{path}: platform {platform!r} is not one of {', '.join(PLATFORMS)}")
    capability = fields.get("compute_capability")
    if capability is not None and not re.fullmatch(r"\d+\.\d+", str(capability)):
        raise UserError(f"{path}: compute_capability {capability!r} is not of the form 9.0")
    return System(**values, platform=platform, compute_capability=capability and str(capability))
