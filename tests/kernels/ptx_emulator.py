"""A CPU emulator of the PTX that kernels/triton_int4_frag.frag_gemv_asm writes, so that the inline assembly behind
the tensor-core GEMV and the accumulating decode is tested where there is no GPU (CI), against the PyTorch
reference, not only on the H200.

It runs the instructions that generator emits (integer and fp32 arithmetic, packed bf16/f16 conversions and
multiplies, lop3, shuffles, predicates, global loads, stores and reductions, and mma.sync m16n8k16 with the
fragment layouts of the PTX ISA), for every thread of every program of a launch at once, in lockstep: the asm has
no branches. Loads and stores go to the memory of CPU tensors, found by address (an address outside every tensor
given is an error, as an out-of-bounds access would be a bug). `griddepcontrol` (PDL) does nothing here; spinning
on flags (pdl=4, the persistent chain) and `.cg`/acquire loads are not emulated.

`EmulatedTileKernel` stands in for a Triton kernel whose body is `triton_int4_frag.run_tile_asm` (plus, for
`_frag_gemv`, its Triton finishing step, which tests leave off) or `run_tile_asm_three` (`_frag_accumulate_swiglu`), so the Python wrappers run unchanged on CPU
tensors with the emulator doing the asm's part.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field

import numpy as np
import torch

_STATEMENT = re.compile(r"^(@!?\w+\s+)?([\w.]+)\s*(.*)$")
_REG_TYPES = {".pred": np.bool_, ".b16": np.uint16, ".b32": np.uint32, ".u32": np.uint32, ".f32": np.uint32,
              ".b64": np.uint64, ".u64": np.uint64}


def _split_operands(text: str) -> list[str]:
    """Operands split at the commas outside braces and brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def _f32(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint32).view(np.float32)


def _bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def _flush(values: np.ndarray) -> np.ndarray:
    """Subnormal floats as (signed) zeros, as .ftz instructions take and give them."""
    values = np.asarray(values, dtype=np.float32)
    return np.where(np.abs(values) < np.finfo(np.float32).tiny, values * np.float32(0), values)


def _bf16_round(values: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits, round to nearest even (NaN kept a NaN)."""
    bits = _bits(values).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(values, dtype=np.float32))
    return np.where(nan, np.uint16(0x7FC0), rounded)


def _half_bits(values: np.ndarray, kind: str) -> np.ndarray:
    """fp32 values -> 16-bit patterns of bf16 or f16 (round to nearest even)."""
    if kind == "bf16":
        return _bf16_round(values)
    return np.asarray(values, dtype=np.float32).astype(np.float16).view(np.uint16)


def _half_values(bits16: np.ndarray, kind: str) -> np.ndarray:
    """16-bit patterns of bf16 or f16 -> fp32 values."""
    if kind == "bf16":
        return (bits16.astype(np.uint32) << 16).view(np.float32)
    return bits16.astype(np.uint16).view(np.float16).astype(np.float32)


def _unpack(bits32: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A packed pair's (low, high) halves as fp32 values."""
    return (_half_values((bits32 & 0xFFFF).astype(np.uint16), kind),
            _half_values((bits32 >> 16).astype(np.uint16), kind))


def _pack(low: np.ndarray, high: np.ndarray, kind: str) -> np.ndarray:
    return _half_bits(low, kind).astype(np.uint32) | (_half_bits(high, kind).astype(np.uint32) << 16)


class Memory:
    """The bytes of CPU tensors, by address."""

    def __init__(self, tensors):
        regions = []
        for t in tensors:
            assert t.device.type == "cpu" and t.is_contiguous(), (t.device, t.shape)
            n = t.numel() * t.element_size()
            if n:
                view = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(t.data_ptr()))
                regions.append((t.data_ptr(), n, view))
        regions.sort(key=lambda r: r[0])
        self.starts = np.array([r[0] for r in regions], dtype=np.uint64)
        self.regions = regions

    def _locate(self, addresses: np.ndarray, nbytes: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(lanes, byte offsets, region bytes) for each region the addresses fall in."""
        index = np.searchsorted(self.starts, addresses, side="right") - 1
        found = []
        for r in np.unique(index):
            lanes = np.nonzero(index == r)[0]
            start, n, view = self.regions[r] if r >= 0 else (0, 0, None)
            offsets = addresses[lanes].astype(np.int64) - int(start)
            if r < 0 or (offsets + nbytes > n).any() or (offsets < 0).any():
                bad = int(addresses[lanes][0])
                raise IndexError(f"emulated access of {nbytes} bytes at {bad:#x} is outside every tensor given")
            found.append((lanes, offsets, view))
        return found

    def load(self, addresses: np.ndarray, nbytes: int) -> np.ndarray:
        """[lanes, nbytes] uint8."""
        out = np.zeros((addresses.size, nbytes), dtype=np.uint8)
        for lanes, offsets, view in self._locate(addresses, nbytes):
            out[lanes] = view[offsets[:, None] + np.arange(nbytes)]
        return out

    def store(self, addresses: np.ndarray, data: np.ndarray) -> None:
        """data [lanes, nbytes] uint8; of lanes storing to one address, the last one's bytes stay."""
        nbytes = data.shape[1]
        for lanes, offsets, view in self._locate(addresses, nbytes):
            view[offsets[:, None] + np.arange(nbytes)] = data[lanes]

    def add_f32(self, addresses: np.ndarray, values: np.ndarray) -> None:
        for lanes, offsets, view in self._locate(addresses, 4):
            assert (offsets % 4 == 0).all(), "unaligned f32 reduction"
            floats = view[:(view.size // 4) * 4].view(np.float32)
            np.add.at(floats, offsets // 4, values[lanes].astype(np.float32))


@dataclass
class Launch:
    """The threads of a grid of programs: ctaid per thread, its tid, its lane."""
    grid: tuple[int, int]
    num_warps: int
    ctaid_x: np.ndarray = field(init=False)
    ctaid_y: np.ndarray = field(init=False)
    tid: np.ndarray = field(init=False)

    def __post_init__(self):
        threads = 32 * self.num_warps
        gx, gy = self.grid
        self.ctaid_x = np.repeat(np.tile(np.arange(gx, dtype=np.uint32), gy), threads)
        self.ctaid_y = np.repeat(np.repeat(np.arange(gy, dtype=np.uint32), gx), threads)
        self.tid = np.tile(np.arange(threads, dtype=np.uint32), gx * gy)

    @property
    def size(self) -> int:
        return self.tid.size


def _statements(asm: str) -> list[str]:
    text = re.sub(r"//[^\n]*", "", asm)
    statements = (s.strip().lstrip("{").strip() for s in text.replace("\n", " ").split(";"))
    return [s for s in statements if s and s != "}"]  # a statement never starts with a vector operand


class _Machine:
    def __init__(self, launch: Launch, operands: list[np.ndarray], memory: Memory):
        self.launch, self.operands, self.memory = launch, operands, memory
        self.regs: dict[str, np.ndarray] = {}
        self.types: dict[str, type] = {}

    # operands -----------------------------------------------------------------------------------------------
    def value(self, text: str, dtype=np.uint32) -> np.ndarray:
        """An operand's bits for every thread, as `dtype`."""
        n = self.launch.size
        text = text.strip()
        if text in self.regs:
            return self.regs[text].astype(dtype) if self.regs[text].dtype != dtype else self.regs[text]
        if text.startswith("$"):
            return np.broadcast_to(self.operands[int(text[1:])].astype(dtype), (n,))
        if text == "%laneid":
            return (self.launch.tid % 32).astype(dtype)
        if text == "%tid.x":
            return self.launch.tid.astype(dtype)
        if text == "%ctaid.x":
            return self.launch.ctaid_x.astype(dtype)
        if text == "%ctaid.y":
            return self.launch.ctaid_y.astype(dtype)
        if text == "%nctaid.x":
            return np.full(n, self.launch.grid[0], dtype=dtype)
        if text == "%nctaid.y":
            return np.full(n, self.launch.grid[1], dtype=dtype)
        if text == "%ntid.x":
            return np.full(n, 32 * self.launch.num_warps, dtype=dtype)
        if text.startswith("0f"):
            return np.full(n, int(text[2:], 16), dtype=dtype)
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", text):
            number = int(text, 0)
            return np.full(n, number % (1 << (8 * np.dtype(dtype).itemsize)), dtype=dtype)
        if text.startswith("{"):  # {lo, hi} of 16-bit registers into 32 bits
            low, high = (self.value(t, np.uint32) & 0xFFFF for t in _split_operands(text[1:-1]))
            return (low | (high << 16)).astype(dtype)
        raise KeyError(f"unknown operand {text!r}")

    def f32(self, text: str) -> np.ndarray:
        return _f32(self.value(text, np.uint32))

    def write(self, name: str, bits: np.ndarray, predicate: np.ndarray | None) -> None:
        if name == "$0":  # the dummy output
            return
        dtype = self.types.get(name)
        if dtype is None:
            raise KeyError(f"register {name!r} written before it is declared")
        bits = np.asarray(bits).astype(dtype)
        if predicate is not None and name in self.regs:
            bits = np.where(predicate, bits, self.regs[name])
        self.regs[name] = np.broadcast_to(bits, (self.launch.size,)).copy()

    def address(self, text: str) -> np.ndarray:
        inner = text.strip()[1:-1]
        base, _, offset = inner.partition("+")
        return self.value(base, np.uint64) + np.uint64(int(offset or "0", 0))

    # execution -----------------------------------------------------------------------------------------------
    def run(self, asm: str) -> None:
        for statement in _statements(asm):
            if statement.startswith(".reg"):
                _, kind, names = statement.split(None, 2)
                for name in names.split(","):
                    self.types[name.strip()] = _REG_TYPES[kind]
                continue
            match = _STATEMENT.match(statement)
            if match is None:
                raise NotImplementedError(f"the PTX emulator cannot parse {statement!r}")
            guard, opcode, rest = match.group(1), match.group(2), match.group(3)
            predicate = None
            if guard:
                name = guard.strip()[1:]
                negate = name.startswith("!")
                predicate = self.regs[name.lstrip("!")].astype(bool)
                predicate = ~predicate if negate else predicate
            self.execute(opcode, _split_operands(rest), predicate)

    def execute(self, op: str, args: list[str], p: np.ndarray | None) -> None:
        u32, f32 = (lambda i: self.value(args[i], np.uint32)), (lambda i: self.f32(args[i]))
        w = lambda bits: self.write(args[0], bits, p)  # noqa: E731
        if op.startswith("griddepcontrol"):
            return
        if op in ("mov.b32", "mov.u32", "mov.f32", "mov.b16"):
            w(self.value(args[1], self.types.get(args[0], np.uint32)))
        elif op == "add.u32":
            w(u32(1) + u32(2))
        elif op == "add.u64":
            w(self.value(args[1], np.uint64) + self.value(args[2], np.uint64))
        elif op == "mul.lo.u32":
            w(u32(1) * u32(2))
        elif op == "mad.lo.u32":
            w(u32(1) * u32(2) + u32(3))
        elif op == "mul.wide.u32":
            w(u32(1).astype(np.uint64) * u32(2).astype(np.uint64))
        elif op == "shr.u32":
            w(u32(1) >> u32(2))
        elif op == "shl.b32":
            w(u32(1) << u32(2))
        elif op == "and.b32":
            w(u32(1) & u32(2))
        elif op == "or.b32":
            w(u32(1) | u32(2))
        elif op == "min.u32":
            w(np.minimum(u32(1), u32(2)))
        elif op == "lop3.b32":
            a, b, c, lut = u32(1), u32(2), u32(3), int(args[4], 0)
            out = np.zeros_like(a)
            for i in range(8):
                if lut >> i & 1:
                    out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
            w(out)
        elif op in ("add.f32", "sub.f32", "mul.f32", "div.rn.f32", "min.f32", "max.f32"):
            fn = {"add.f32": np.add, "sub.f32": np.subtract, "mul.f32": np.multiply, "div.rn.f32": np.divide,
                  "min.f32": np.fmin, "max.f32": np.fmax}[op]
            with np.errstate(all="ignore"):
                w(_bits(fn(f32(1), f32(2))))
        elif op == "fma.rn.f32":
            w(_bits((f32(1).astype(np.float64) * f32(2) + f32(3)).astype(np.float32)))
        elif op == "abs.f32":
            w(u32(1) & 0x7FFFFFFF)
        elif op == "neg.f32":
            w(u32(1) ^ 0x80000000)
        elif op == "ex2.approx.f32":
            with np.errstate(all="ignore"):
                w(_bits(np.exp2(f32(1))))
        elif op in ("ex2.approx.ftz.f32", "rcp.approx.ftz.f32", "rsqrt.approx.ftz.f32"):  # subnormals flushed to 0
            fn = {"ex2": np.exp2, "rcp": lambda v: np.float32(1.0) / v,
                  "rsqrt": lambda v: np.float32(1.0) / np.sqrt(v)}[op.split(".")[0]]
            with np.errstate(all="ignore"):
                w(_bits(_flush(fn(_flush(f32(1))))))
        elif op == "selp.f32":
            w(np.where(self.regs[args[3]].astype(bool), u32(1), u32(2)))
        elif op.startswith("setp."):
            parts = op.split(".")  # setp.CMP[.and].u32
            compare = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
                       "gt": np.greater, "ge": np.greater_equal}[parts[1]]
            result = compare(u32(1), u32(2))
            if "and" in parts:
                result &= self.regs[args[3]].astype(bool)
            w(result)
        elif op == "cvt.rn.f32.u32":
            w(_bits(u32(1).astype(np.float32)))
        elif op == "cvt.u32.u16":
            w(u32(1) & 0xFFFF)
        elif op == "cvt.u64.u32":
            w(u32(1).astype(np.uint64))
        elif op == "cvt.f32.f16":
            w(_bits(_half_values(u32(1).astype(np.uint16), "f16")))
        elif op in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):  # d = {b (low), a (high)}
            w(_pack(f32(2), f32(1), "bf16" if "bf16" in op else "f16"))
        elif op in ("mul.rn.bf16x2", "mul.rn.f16x2"):
            kind = "bf16" if "bf16" in op else "f16"
            (a0, a1), (b0, b1) = _unpack(u32(1), kind), _unpack(u32(2), kind)
            w(_pack(a0 * b0, a1 * b1, kind))  # the fp32 product of two halves is exact: one rounding
        elif op == "shfl.sync.bfly.b32":
            source = np.arange(self.launch.size) ^ (int(args[2], 0) & 31)
            w(u32(1)[source])
        elif op == "shfl.sync.idx.b32":  # from lane b of the same warp
            source = np.arange(self.launch.size) // 32 * 32 + (u32(2) & 31)
            w(u32(1)[source])
        elif op.startswith("mma.sync.aligned.m16n8k16.row.col.f32."):
            self.mma(op.split(".")[-3], args, p)
        elif op.startswith("ld.global"):
            self.load(op, args, p)
        elif op == "st.global.f32":
            lanes = np.arange(self.launch.size) if p is None else np.nonzero(p)[0]
            data = self.value(args[1], np.uint32)[lanes].astype("<u4").view(np.uint8).reshape(-1, 4)
            self.memory.store(self.address(args[0])[lanes], data)
        elif op == "st.global.v4.f32":
            lanes = np.arange(self.launch.size) if p is None else np.nonzero(p)[0]
            values = np.stack([self.value(t, np.uint32)[lanes] for t in _split_operands(args[1][1:-1])], axis=1)
            self.memory.store(self.address(args[0])[lanes], values.astype("<u4").view(np.uint8).reshape(-1, 16))
        elif op == "red.global.add.f32":
            lanes = np.arange(self.launch.size) if p is None else np.nonzero(p)[0]
            self.memory.add_f32(self.address(args[0])[lanes], self.f32(args[1])[lanes])
        else:
            raise NotImplementedError(f"the PTX emulator does not run {op!r}")

    def load(self, op: str, args: list[str], p: np.ndarray | None) -> None:
        parts = op.split(".")
        if "cg" in parts or "acquire" in parts:
            raise NotImplementedError(f"the PTX emulator does not run {op!r}")
        kind = parts[-1]
        count = 4 if "v4" in parts else 2 if "v2" in parts else 1
        size = {"b32": 4, "f32": 4, "u32": 4, "b16": 2, "u8": 1}[kind]
        lanes = np.arange(self.launch.size) if p is None else np.nonzero(p)[0]
        raw = self.memory.load(self.address(args[1])[lanes], size * count)
        values = raw.view({4: "<u4", 2: "<u2", 1: "u1"}[size]).reshape(len(lanes), count)
        targets = _split_operands(args[0][1:-1]) if args[0].startswith("{") else [args[0]]
        for i, name in enumerate(targets):
            full = self.regs.get(name, np.zeros(self.launch.size, dtype=self.types[name])).copy()
            full[lanes] = values[:, i].astype(self.types[name])
            self.regs[name] = full

    def mma(self, kind: str, args: list[str], p: np.ndarray | None) -> None:
        """D = A B + C per warp, m16n8k16, A row-major 16x16 and B column-major 16x8 in halves, C and D fp32,
        with the PTX ISA's fragment layouts (lane = 4 groupID + threadID_in_group)."""
        assert p is None, "a predicated mma"
        d, a, b, c = (_split_operands(x[1:-1]) for x in args)
        warps = self.launch.size // 32
        lane = np.arange(32)
        group, quad = lane // 4, lane % 4
        A = np.zeros((warps, 16, 16), dtype=np.float64)
        for reg in range(4):
            low, high = (v.reshape(warps, 32) for v in _unpack(self.value(a[reg], np.uint32), kind))
            row = group + 8 * (reg % 2)
            col = 2 * quad + 8 * (reg // 2)
            A[:, row, col], A[:, row, col + 1] = low, high
        B = np.zeros((warps, 16, 8), dtype=np.float64)
        for reg in range(2):
            low, high = (v.reshape(warps, 32) for v in _unpack(self.value(b[reg], np.uint32), kind))
            k = 2 * quad + 8 * reg
            B[:, k, group], B[:, k + 1, group] = low, high
        C = np.zeros((warps, 16, 8), dtype=np.float64)
        for reg in range(4):
            row, col = group + 8 * (reg // 2), 2 * quad + reg % 2
            C[:, row, col] = self.f32(c[reg]).reshape(warps, 32)
        D = (A @ B + C).astype(np.float32)
        for reg in range(4):
            row, col = group + 8 * (reg // 2), 2 * quad + reg % 2
            self.write(d[reg], _bits(D[:, row, col].reshape(-1)), None)


def run_asm(asm: str, launch: Launch, operands: list, tensors: list[torch.Tensor]) -> None:
    """Runs `asm` for every thread of `launch`; operands $1.. are ints (addresses and u32 values), or arrays of one
    per thread (operands[0], $0's, is unused); `tensors` the memory it may touch."""
    values = [np.broadcast_to(np.asarray(v, dtype=np.uint64), (launch.size,)) for v in operands]
    _Machine(launch, values, Memory(tensors)).run(asm)


class EmulatedTileKernel:
    """Stands in for `_frag_accumulate` (kernels/triton_int4_accumulate.py) or `_frag_gemv` without its finishing
    step (kernels/triton_int4_frag.py): `kernel[grid](*args, **meta)` runs the ASM meta-argument on the
    emulator with the operands `run_tile_asm` would give it."""

    def __init__(self, kind: str, counts_with: "EmulatedTileKernel | None" = None):
        assert kind in ("accumulate", "gemv", "swiglu")
        self.kind = kind
        self._launches = counts_with._launches if counts_with is not None else [0]  # shared with `counts_with`

    @property
    def launches(self) -> int:
        return self._launches[0]

    def __getitem__(self, grid):
        grid = tuple(grid) + (1,) * (2 - len(grid))

        def launch(*args, **meta):
            self._launches[0] += 1
            threads = Launch(grid, meta["NUM_WARPS"])
            if self.kind == "swiglu":  # _frag_accumulate_swiglu(qw, gate_up, s, z, out, shares, zero0, zero1, N, G)
                tensors = args[:8]
                operands = [0, *(t.data_ptr() for t in tensors[:5]), args[8], args[9],
                            *(t.data_ptr() for t in tensors[5:])]
                run_asm(meta["ASM"], threads, operands, list(tensors))
                return
            rows = np.uint64(meta.get("ROWS", 1))
            program_x, program_y = (c.astype(np.uint64) for c in (threads.ctaid_x, threads.ctaid_y))
            if self.kind == "accumulate":  # _frag_accumulate(qw, x, s, z, acc, nw, squares, N, G, ...)
                qw, x, s, z, out, nw, squares, N, G = args[:9]
                extra = meta["EXTRA"]
                share = np.uint64(squares.data_ptr()) + np.uint64(4) * rows * program_y
            else:  # _frag_gemv(qw, x, s, z, y, partial, counter, res, nw, eps, N, G, SPLIT, ...): partials, then shares
                qw, x, s, z, _, out, _, _, nw, _, N, G, split = args[:13]
                extra = meta.get("NORM", False)
                squares = out
                base = np.uint64(out.data_ptr() + 4 * split * int(rows) * N)
                share = base + np.uint64(4) * (program_x * np.uint64(split) * rows + program_y * rows)
            operands = [0, *(t.data_ptr() for t in (qw, x, s, z, out)), N, G]
            if extra:
                operands += [nw.data_ptr(), share]
            run_asm(meta["ASM"], threads, operands, [qw, x, s, z, out, nw, squares])
        return launch
