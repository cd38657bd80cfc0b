"""What XLA says about the real training step, compiled ahead of time from abstract shapes for a
mesh of simulated devices: per-device memory, and the collectives in the partitioned program.

Collective bytes are those a ring moves per device: an all-gather of an N-byte result or a
reduce-scatter of an N-byte operand moves N·(n-1)/n, an all-reduce twice that, an all-to-all
N·(n-1)/n, a collective-permute N times the share of devices that send (a rotation split into two
permutes sends N once per device). A collective inside a loop body counts once per iteration
(XLA records each loop's trip count).

A collective counts at the width of the data the program gave it. XLA's CPU compiler runs no
collective in 16 bits: its float normalization converts a bf16 operand to f32 before the
collective, and back after, which doubles the bytes of every bf16 collective in a CPU-compiled
step; GPU backends run them in bf16. What it leaves: a reduction's summing computation renamed
`..._promoted` (its operand may then be computed in f32 already, the CPU's excess precision), and
before any other collective a convert from bf16 (or f16) to f32 without the `op_name` that every
conversion the program wrote carries, found through data movement and fusions. Those count at 2
bytes a number. A conversion the program wrote itself, a bf16 gradient summed in f32, counts at f32.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field

from agx.config import Config

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
               "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CHILD = re.compile(r"(body|calls|to_apply|condition)=%?([\w.\-]+)")
_TRIP = re.compile(r'known_trip_count[^0-9]*"n":"?(\d+)')
# an instruction with one array result: name, element type, opcode, operands
_DEFINITION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = (\w+)\[[\d,]*\]\S* ([\w\-]+)\(([^)]*)\)")
_MOVES = ("bitcast", "copy", "reshape", "transpose")


@dataclass
class CompiledStep:
    devices: int
    memory: dict  # bytes per device: arguments, outputs, aliased, temporaries, total
    # kind -> {"count": ops run per step, "bytes": per device, "in_loops": of those bytes, the ones in loop bodies}
    collectives: dict = field(default_factory=dict)
    compile_s: float = 0.0
    note: str = ""  # how the compiled layout relates to the one planned, when it is not the same


def compile_step(cfg: Config, devices=None) -> CompiledStep:
    """AOT-compiles cfg's training step on `devices` (default: all) from ShapeDtypeStructs."""
    from agx.training.loop import Trainer

    started = time.perf_counter()
    note = ""
    if cfg.model.attention == "cudnn":  # its kernel compiles on NVIDIA GPUs only
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="xla"))
        note = "; agx's dense attention in place of cuDNN's, whose scores never reach memory"
    trainer = Trainer.build(cfg, devices)
    compiled = trainer.compile()
    m = compiled.memory_analysis()
    memory = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
              "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    memory["total"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    return CompiledStep(trainer.mesh.devices.size, memory, collectives_in(compiled.as_text(), trainer.mesh.devices.size),
                        time.perf_counter() - started, note)


def collectives_in(hlo: str, num_devices: int) -> dict:
    """Per kind: how many collectives a step runs and the bytes each device moves for them."""
    per_computation, children, definitions, roots, current = {}, {}, {}, {}, None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line[:1].isspace():  # instructions are indented, computation headers not
            current = header.group(1)
            per_computation[current], children[current], definitions[current] = [], [], {}
            continue
        if current is None:
            continue
        trip = _TRIP.search(line)
        for role, child in _CHILD.findall(line):
            children[current].append((child, int(trip.group(1)) if trip and role == "body" else 1, role == "body"))
        definition = _DEFINITION.match(line)
        if definition:
            root, name, dtype, opcode, operands = definition.groups()
            calls = re.search(r"(?:calls|to_apply)=%?([\w.\-]+)", line)  # a fusion's; a call's (jaxlib 0.5)
            definitions[current][name] = (dtype, opcode, re.findall(r"%([\w.\-]+)", operands),
                                          "op_name=" in line, calls.group(1) if calls else None)
            if root:
                roots[current] = name
        op = _INSTRUCTION.match(line)
        if op:
            kind, n = op.group(2), _group(line, num_devices)
            factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": _senders(line) / num_devices}.get(kind, (n - 1) / n)
            # The width the program gave a synchronous collective of one array where XLA widened it:
            # 2 for a promoted reduction; for the others, found from the operand once all is read.
            given = None
            if definition and not op.group(3):
                if re.search(r"to_apply=%?[\w.\-]+_promoted\b", line):
                    given = 2
                elif kind not in ("all-reduce", "reduce-scatter"):
                    given = definition.group(2)
            width = DTYPE_BYTES.get(definition.group(3)) if definition else None
            per_computation[current].append((kind, _payload(kind, op.group(1), bool(op.group(3)), n), factor,
                                             given, width))
    called = {child for kids in children.values() for child, _, _ in kids}
    runs = {name: 1 for name in per_computation if name not in called}  # ENTRY (and anything unreferenced)
    looped = set()  # computations that run inside a loop body
    pending = list(runs)
    while pending:
        name = pending.pop()
        for child, trip, body in children.get(name, []):
            if child in per_computation:
                runs[child] = runs.get(child, 0) + runs[name] * trip
                if body or name in looped:
                    looped.add(child)
                pending.append(child)
    totals = {kind: {"count": 0, "bytes": 0, "in_loops": 0} for kind in KINDS}
    for name, ops in per_computation.items():
        for kind, payload, factor, given, width in ops:
            if isinstance(given, str):  # the collective's own name
                operands = definitions[name][given][2]
                given = _carried_width(operands[0], name, definitions, roots) if operands else None
            payload = payload * given // width if given and width else payload
            moved = int(runs.get(name, 0) * payload * factor)
            totals[kind]["count"] += runs.get(name, 0)
            totals[kind]["bytes"] += moved
            totals[kind]["in_loops"] += moved if name in looped else 0
    return {kind: t for kind, t in totals.items() if t["count"]}


def _carried_width(name: str, computation: str, definitions: dict, roots: dict) -> int | None:
    """The bytes a number of the value `name` carries, where a compiler pass widened it (see the
    module's docstring): followed through data movement and into the fusions that compute it."""
    for _ in range(64):
        dtype, opcode, operands, written, calls = definitions[computation].get(name, (None, None, [], True, None))
        if opcode in ("fusion", "call") and calls in roots:
            computation, name = calls, roots[calls]
        elif opcode in _MOVES and operands:
            name = operands[0]
        elif opcode == "convert" and not written and operands and operands[0] in definitions[computation]:
            source = DTYPE_BYTES.get(definitions[computation][operands[0]][0], 0)
            return source if 0 < source < DTYPE_BYTES[dtype] else None
        else:
            return None
    return None


def _payload(kind: str, result_type: str, asynchronous: bool, group: int) -> int:
    """Bytes of the gathered results (all-gather), of the operands (reduce-scatter), else of the data.
    A combined collective has a tuple of results; an async start's tuple also holds its operands."""
    sizes = [DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
             for d, dims in _SHAPE.findall(result_type) if d != "u32"]  # u32: async context words
    total = sum(sizes)
    if asynchronous and kind == "all-gather":  # (operands, results): the results are n times larger
        return total * group // (group + 1)
    if asynchronous and kind == "collective-permute":
        return total // 2
    if kind == "reduce-scatter":
        return total * group // (group + 1) * (group + 1) if asynchronous else total * group
    return total


def _senders(line: str) -> int:
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    return len(re.findall(r"\{\d+,\d+\}", pairs.group(1))) if pairs else 0


def _group(line: str, num_devices: int) -> int:
    """Devices in each replica group of the collective."""
    # mesh['a'=8,'b'=2] {'a'}, or with the devices' order between: mesh[...], device_ids=([4,2]T(1,0)) {'a'}
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)?\s*\{([^}]*)\}", line)
    if mesh:
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes[name] for name in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if explicit and explicit.group(1):
        return len(explicit.group(1).split(","))
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", line)
    return 2 if pairs else num_devices
