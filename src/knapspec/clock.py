"""The one synchronised clock: on CUDA, kernels run asynchronously, so a time read without
synchronising measures the launch, not the work. Every timing in knapspec (the engine's round
times, the latency profiler, the benchmarks) reads it through here."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def now(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done."""
    sync(device)
    return time.perf_counter()
