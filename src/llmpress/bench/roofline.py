"""The batch-1 decode roofline: tokens/s if every step is limited by memory bandwidth alone.

At batch 1 a decode step does one multiply-add (2 FLOPs) per weight while reading that weight's
2 bytes (bf16): 1 FLOP/byte, against an H100's ~300 FLOP/byte balance. So the step time is bounded
below by (bytes that must cross memory) / (achievable bandwidth). We measure the achievable bandwidth
with a large device-to-device copy (what the hardware really sustains: ~3.0 TB/s read + write on an
H100 SXM, ~90% of its 3.35 TB/s datasheet figure) and count the bytes from the config.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from llmpress.analyze import layer_parameter_counts
from llmpress.config import LlamaConfig

# int4 with one fp16 scale per group of 128 weights: 4 + 16/128 = 4.125 bits; an fp16 zero point (or
# packing slack) per group brings it to 4.25 bits. We use 4.25 bits/param for the estimate.
INT4_G128_BYTES_PER_PARAM = 4.25 / 8


def measure_copy_bandwidth(device: str | torch.device, nbytes: int | None = None, repeats: int = 20) -> float:
    """Achievable memory bandwidth in bytes/s: (read + write bytes) of `dst.copy_(src)`, median of `repeats`."""
    device = torch.device(device)
    if nbytes is None:
        # 1 GiB dwarfs any GPU's L2 (50 MiB on H100); 128 MiB exceeds a CPU's last-level cache.
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 27
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        nbytes = min(nbytes, free_bytes // 8)  # src + dst then take at most a quarter of free memory
    assert nbytes > 0 and repeats > 0
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # ones, not empty: touch every page
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up: first-touch page faults, allocator, lazy CUDA init
        dst.copy_(src)
    seconds = _time_copies_cuda(src, dst, repeats) if device.type == "cuda" else _time_copies_cpu(src, dst, repeats)
    del src, dst
    return 2 * nbytes / statistics.median(seconds)


def _time_copies_cuda(src: torch.Tensor, dst: torch.Tensor, repeats: int) -> list[float]:
    with torch.cuda.device(src.device):
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            dst.copy_(src)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]  # elapsed_time is in ms


def _time_copies_cpu(src: torch.Tensor, dst: torch.Tensor, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - t0)
    return seconds


def device_name(device: str | torch.device) -> str:
    """Human-readable name of the device the bandwidth was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{device.type}: {cpu} ({torch.get_num_threads()} threads)"


def decode_bytes_per_token(config: LlamaConfig, weight_bytes_per_param: float = 2.0, context_len: int = 0,
                           kv_bytes_per_elem: float = 2.0, batch_size: int = 1,
                           head_bytes_per_param: float | None = None) -> int:
    """Bytes that must cross memory for one decode step of `batch_size` sequences.

    The model, per step:
    - every decoder-layer weight (q/k/v/o, gate/up/down, biases, both norms) and the final norm is
      read once, however many sequences are in the batch (that is why batching helps decode);
    - the embedding lookup reads only `batch_size` rows of embed_tokens;
    - lm_head reads its whole [vocab, hidden] matrix, even when it is tied to embed_tokens: tying
      saves memory, not bandwidth. So tied and untied models read the same bytes here; only the
      parameter count (which counts the tied matrix once) differs;
    - each sequence reads K and V for `context_len` cached positions in every layer.
    Activations, logits and the new token's K/V write are ignored (kilobytes at batch 1).
    `head_bytes_per_param` prices embed_tokens and lm_head separately (default: `weight_bytes_per_param`),
    for quantized models that keep them in bf16.
    """
    assert context_len >= 0 and batch_size >= 1
    head_bytes_per_param = weight_bytes_per_param if head_bytes_per_param is None else head_bytes_per_param
    h = config.hidden_size
    layer = sum(layer_parameter_counts(config).values())
    body_params = config.num_hidden_layers * layer + h  # + final norm
    head_params = min(batch_size, config.vocab_size) * h + config.vocab_size * h  # embed rows + full lm_head
    kv_elems = batch_size * config.num_hidden_layers * 2 * context_len * config.num_key_value_heads * config.head_dim
    return round(body_params * weight_bytes_per_param + head_params * head_bytes_per_param
                 + kv_elems * kv_bytes_per_elem)


def roofline_tokens_per_s(bytes_per_step: float, bandwidth_bytes_per_s: float, batch_size: int = 1) -> float:
    """Upper bound on decode tokens/s: each step moves `bytes_per_step` and yields `batch_size` tokens."""
    return batch_size * bandwidth_bytes_per_s / bytes_per_step


@dataclass
class RooflineRow:
    label: str
    weight_bytes_per_param: float
    head_bytes_per_param: float  # embed_tokens and lm_head
    bytes_per_token: int
    tokens_per_s: float | None  # None when the bandwidth was not measured
    estimate: bool  # True for formats the model is not loaded in


@dataclass
class DecodeRoofline:
    device: str
    bandwidth_bytes_per_s: float | None
    batch_size: int
    context_len: int
    kv_bytes_per_elem: float
    rows: list[RooflineRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def decode_roofline(config: LlamaConfig, dtype: torch.dtype, device: str, bandwidth_bytes_per_s: float | None,
                    context_len: int = 0, batch_size: int = 1) -> DecodeRoofline:
    """Roofline rows for the model's dtype and for int4 g128 weights (the latter labelled as estimates)."""
    dtype_bytes = float(torch.empty((), dtype=dtype).element_size())
    kv_bytes = dtype_bytes  # the KV cache is kept in the activation dtype
    dtype_name = str(dtype).replace("torch.", "")
    variants = [
        (f"{dtype_name} (as loaded)", dtype_bytes, dtype_bytes, False),
        ("int4 g128, all weights (estimate)", INT4_G128_BYTES_PER_PARAM, INT4_G128_BYTES_PER_PARAM, True),
        (f"int4 g128, {dtype_name} embed/lm_head (estimate)", INT4_G128_BYTES_PER_PARAM, dtype_bytes, True),
    ]
    roofline = DecodeRoofline(device, bandwidth_bytes_per_s, batch_size, context_len, kv_bytes)
    for label, weight_bytes, head_bytes, estimate in variants:
        nbytes = decode_bytes_per_token(config, weight_bytes, context_len, kv_bytes, batch_size, head_bytes)
        tokens_per_s = (None if bandwidth_bytes_per_s is None
                        else roofline_tokens_per_s(nbytes, bandwidth_bytes_per_s, batch_size))
        roofline.rows.append(RooflineRow(label, weight_bytes, head_bytes, nbytes, tokens_per_s, estimate))
    return roofline
