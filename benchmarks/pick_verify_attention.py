"""Prints `--triton-verify-attention` if verify_probe_gpu.py timed the accumulating verify step faster with the
Triton decode kernel than with SDPA (for a shell that runs speculative_gpu.py next), else nothing."""
import json
import sys

timing = json.load(open(sys.argv[1]))["timing"]
sdpa, triton = timing["verify 6, accumulating"]["ms"], timing["verify 6, accumulating, Triton attention"]["ms"]
print("--triton-verify-attention" if triton < sdpa else "")
