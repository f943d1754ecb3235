"""Host values to device tensors without waiting for the GPU (what overlapped scheduling relies on)."""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A list or numpy array as a tensor on `device`. On CUDA the copy goes through pinned memory and is
    non-blocking: a copy from pageable memory would wait for everything already queued on the GPU."""
    tensor = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
