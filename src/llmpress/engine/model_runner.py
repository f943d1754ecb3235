"""Tensors in, logits out: packs a scheduled step into one flat batch and runs the model on the paged cache.

All sequences of a step share one row of N tokens (no padding between prompts); each one's metadata says
where its tokens go in the cache and what they attend to. Decode-only steps on CUDA replay a CUDA graph
captured for the next larger batch size, with padding rows writing to the cache's scratch block.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from llmpress.engine.config import EngineConfig
from llmpress.engine.paged_cache import PagedAttentionMetadata, PagedKVCache, bytes_per_block, full_prefill_metadata
from llmpress.engine.scheduler import SchedulerOutput
from llmpress.engine.sequence import PLACEHOLDER_TOKEN
from llmpress.engine.transfer import to_device
from llmpress.errors import LlmpressError
from llmpress.model import LlamaForCausalLM
from llmpress.quant.linear import use_decode_layouts

log = logging.getLogger(__name__)


def graph_batch_sizes(largest: int) -> list[int]:
    """Captured decode batch sizes: 1, 2, 4, 8, then every 8 up to 64, then every 32 (as vLLM does)."""
    sizes = [s for s in (1, 2, 4) if s < largest] + list(range(8, min(largest, 64) + 1, 8))
    sizes += list(range(96, largest + 1, 32))
    if not sizes or sizes[-1] != largest:
        sizes.append(largest)
    return sorted(set(sizes))


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, max_model_len: int):
        self.model, self.config, self.max_model_len = model, config, max_model_len
        self.device, self.dtype, self.block_size = model.device, model.dtype, config.block_size
        self.on_cuda = self.device.type == "cuda"
        use_decode_layouts(model, self.on_cuda, fuse=self.on_cuda)  # as the generator does
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.num_blocks = config.num_gpu_blocks or self._blocks_that_fit()
        self.cache = PagedKVCache(model.config, self.num_blocks, self.block_size, self.dtype,
                                  config.kv_cache_dtype, self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.use_graphs = self.on_cuda and not config.enforce_eager
        if self.use_graphs:
            self._capture_graphs()

    # -- sizing ------------------------------------------------------------------------------------
    def _blocks_that_fit(self) -> int:
        per_block = bytes_per_block(self.model.config, self.block_size, self.config.kv_cache_dtype, self.dtype)
        if not self.on_cuda:
            return max(1, self.config.cpu_kv_tokens // self.block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, cuBLAS workspaces
        kv_bytes = int(total * self.config.gpu_memory_utilization) - peak - outside_torch
        num_blocks = kv_bytes // per_block
        if num_blocks < self.max_blocks_per_seq:
            raise LlmpressError(f"only {max(num_blocks, 0)} KV blocks fit in {self.config.gpu_memory_utilization:.0%} of GPU "
                                f"memory, fewer than one {self.max_model_len}-token sequence needs; raise "
                                "--gpu-memory-utilization or lower --max-model-len.")
        log.info("KV cache: %d blocks of %d tokens (%.1f GiB)", num_blocks, self.block_size, num_blocks * per_block / 2**30)
        return num_blocks

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """One step of the largest token budget, so its activations count against the memory budget."""
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        meta, num_blocks = full_prefill_metadata(1, n, self.block_size, self.device)
        cache = PagedKVCache(self.model.config, num_blocks, self.block_size, self.dtype, self.config.kv_cache_dtype,
                             self.device)
        rows = torch.arange(max(0, n - self.config.max_num_seqs), n, device=self.device)
        self.model(torch.zeros(1, n, dtype=torch.long, device=self.device), torch.arange(n, device=self.device),
                   cache.bind(meta), logits_indices=rows).float()
        del cache

    # -- inputs --------------------------------------------------------------------------------------
    def _to_device(self, values, dtype) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    def prepare(self, out: SchedulerOutput):
        """Flat inputs of the step: token ids [N], positions [N], slots [N], seq_lens [S], query starts [S+1],
        logits row indices [M] (lists), block tables (int32 array [S, widest table], padded with scratch) and
        placeholders: (index in token ids, seq_id) for each token still on the device (overlapped scheduling)."""
        bs = self.block_size
        input_ids, positions, slots, seq_lens, starts, logits_rows, placeholders = [], [], [], [], [0], [], []
        width = max(len(c.seq.block_table) for c in out.chunks)
        tables = np.full((len(out.chunks), width), self.cache.scratch_block, dtype=np.int32)
        for row, chunk in enumerate(out.chunks):
            seq = chunk.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk.num_tokens
            table = seq.block_table
            tables[row, :len(table)] = table
            input_ids += seq.token_ids_slice(start, end - chunk.num_spec_tokens)
            if input_ids[-1] == PLACEHOLDER_TOKEN:  # only ever a sequence's last token
                input_ids[-1] = 0
                placeholders.append((len(input_ids) - 1, seq.seq_id))
            input_ids += seq.spec_token_ids[:chunk.num_spec_tokens]
            if end - start == 1:  # decode: skip the range machinery
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                positions += range(start, end)
                slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            starts.append(starts[-1] + chunk.num_tokens)
            if chunk.completes_sequence:  # the last token's logits, and each draft token's to verify it
                logits_rows += range(starts[-1] - 1 - chunk.num_spec_tokens, starts[-1])
        return input_ids, positions, slots, seq_lens, starts, logits_rows, tables, placeholders

    # -- execution -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, previous_tokens: tuple[torch.Tensor, dict[int, int]] | None = None
                ) -> torch.Tensor:
        """Run the step; logits [M, V] for the chunks that complete their sequence, in schedule order
        (1 + num_spec_tokens rows for a chunk with drafts: one per draft position, then the last).
        previous_tokens: the step before's sampled tokens, still on the device, and seq_id -> their row,
        for the placeholders that overlapped scheduling left in sequences (copied on the device, no sync)."""
        input_ids, positions, slots, seq_lens, starts, logits_rows, tables, placeholders = self.prepare(out)
        fill = None
        if placeholders:
            if previous_tokens is None:
                raise AssertionError("a step with placeholder tokens needs the previous step's sampled tokens")
            sampled, row_of = previous_tokens
            fill = (self._to_device([i for i, _ in placeholders], torch.long),
                    sampled[self._to_device([row_of[seq_id] for _, seq_id in placeholders], torch.long)])
        batch = len(out.chunks)
        if self.use_graphs and out.is_decode_only and batch <= self.graph_sizes[-1]:
            return self._replay(input_ids, positions, slots, seq_lens, tables, fill)
        meta = PagedAttentionMetadata(
            slot_mapping=self._to_device(slots, torch.long),
            block_tables=self._to_device(tables, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            query_start_loc=self._to_device(starts, torch.int32),
            max_query_len=max(c.num_tokens for c in out.chunks), max_seq_len=max(seq_lens))
        ids = self._to_device([input_ids], torch.long)
        if fill is not None:
            ids[0].index_copy_(0, *fill)
        logits = self.model(ids, self._to_device(positions, torch.long),
                            self.cache.bind(meta), logits_indices=self._to_device(logits_rows, torch.long))
        return logits[0]

    # -- CUDA graphs for decode -------------------------------------------------------------------------
    def _capture_graphs(self) -> None:
        largest = min(self.config.cuda_graph_max_batch or self.config.max_num_seqs, self.config.max_num_seqs)
        self.graph_sizes = graph_batch_sizes(largest)
        d, scratch = self.device, self.cache.scratch_block
        self.static = dict(
            input_ids=torch.zeros(1, largest, dtype=torch.long, device=d),
            positions=torch.zeros(largest, dtype=torch.long, device=d),
            slot_mapping=torch.full((largest,), scratch * self.block_size, dtype=torch.long, device=d),
            block_tables=torch.full((largest, self.max_blocks_per_seq), scratch, dtype=torch.int32, device=d),
            seq_lens=torch.ones(largest, dtype=torch.int32, device=d),
            query_start_loc=torch.arange(largest + 1, dtype=torch.int32, device=d))
        self.static_logits: dict[int, torch.Tensor] = {}
        self.decode_forward = self.model
        if self.config.compile:
            # One compile with a symbolic batch size serves every captured size: Inductor fuses the norm,
            # rope and activation arithmetic that the eager graph runs as dozens of small kernels per layer.
            self.decode_forward = torch.compile(self.model, dynamic=True, options={"triton.cudagraphs": False})
        pool = None
        with torch.inference_mode():
            for size in reversed(self.graph_sizes):  # largest first, so smaller graphs reuse its memory pool
                step = self._graph_step(size)
                stream = torch.cuda.Stream(d)
                stream.wait_stream(torch.cuda.current_stream(d))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream(d).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.static_logits[size] = step()
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.synchronize(d)

    def _graph_step(self, size: int):
        s = self.static
        meta = PagedAttentionMetadata(
            slot_mapping=s["slot_mapping"][:size], block_tables=s["block_tables"][:size],
            seq_lens=s["seq_lens"][:size], query_start_loc=s["query_start_loc"][:size + 1],
            max_query_len=1, max_seq_len=self.max_model_len)
        cache = self.cache.bind(meta)
        return lambda: self.decode_forward(s["input_ids"][:, :size], s["positions"][:size], cache)[0]

    def _replay(self, input_ids, positions, slots, seq_lens, tables, fill) -> torch.Tensor:
        batch = len(input_ids)
        size = next(s for s in self.graph_sizes if s >= batch)
        s, scratch = self.static, self.cache.scratch_block
        pad = size - batch
        # Padding rows: one token at the scratch block, so they compute junk that nobody reads.
        s["input_ids"][0, :size].copy_(self._to_device(input_ids + [0] * pad, torch.long), non_blocking=True)
        if fill is not None:
            s["input_ids"][0].index_copy_(0, *fill)
        s["positions"][:size].copy_(self._to_device(positions + [0] * pad, torch.long), non_blocking=True)
        s["slot_mapping"][:size].copy_(self._to_device(slots + [scratch * self.block_size] * pad, torch.long),
                                       non_blocking=True)
        s["seq_lens"][:size].copy_(self._to_device(seq_lens + [1] * pad, torch.int32), non_blocking=True)
        width = tables.shape[1]
        if pad:  # padding rows read the scratch block only
            tables = np.concatenate([tables, np.full((pad, width), scratch, dtype=np.int32)])
        # Columns past `width` keep stale block ids from earlier steps; attention never reads past seq_len.
        s["block_tables"][:size, :width].copy_(self._to_device(tables, torch.int32), non_blocking=True)
        self.graphs[size].replay()
        return self.static_logits[size][:batch]
