"""Making the perturbed replicas, and keeping random state under control while they train."""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from stabwatch.analysis._log import analysis_logger
from stabwatch.errors import StabwatchError

__all__: list[str] = []

logger = analysis_logger()

#: Noise scale used for a tensor that is identically zero (same constant as deep-lyapunov).
_ZERO_TENSOR_SCALE = 0.01


def tracked_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters (``requires_grad``), shared ones once, in registration order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def noise_sigma(tensor: torch.Tensor) -> float:
    r"""Per-tensor noise scale ``sigma(W)`` (multiplied by `perturbation_scale`).

    ``std(W)`` (unbiased, as deep-lyapunov) when ``W`` has several distinct values; otherwise its
    RMS ``sqrt(mean W^2)`` (a one-element or constant tensor: deep-lyapunov turned the NaN std of a
    one-element tensor into NaN weights); 0.01 for an all-zero tensor.
    """
    w = tensor.detach().float()
    if w.numel() > 1:
        std = float(w.std())
        if math.isfinite(std) and std > 0.0:
            return std
    rms = float(w.square().mean().sqrt()) if w.numel() else 0.0
    if math.isfinite(rms) and rms > 0.0:
        return rms
    return _ZERO_TENSOR_SCALE


def perturb_parameters(model: nn.Module, scale: float, generator: torch.Generator | None) -> float:
    r"""Add ``scale * sigma(W) * xi`` to every trainable tensor ``W`` of ``model``, in place.

    ``xi ~ N(0, I)`` is drawn on the CPU from ``generator`` (the global generator when None), tensor by
    tensor in registration order, in float32 (float64 for float64 tensors), and added in that
    precision, rounded once to the parameter's dtype: for float32 parameters the same numbers as
    ``W + torch.randn_like(W) * scale * W.std()`` on the CPU.

    Returns:
        The L2 norm of the noise, over all tensors, before rounding.
    """
    total = 0.0
    with torch.no_grad():
        for _, p in tracked_parameters(model):
            noise_dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
            noise = torch.randn(p.shape, generator=generator, dtype=noise_dtype)
            noise.mul_(scale).mul_(noise_sigma(p))  # same rounding as randn * scale * std
            total += float(torch.linalg.vector_norm(noise)) ** 2
            if p.dtype == noise_dtype:
                p.add_(noise.to(p.device))
            else:
                p.copy_((p.to(noise_dtype) + noise.to(p.device)).to(p.dtype))
            del noise
    return math.sqrt(total)


def make_replicas(
    model: nn.Module, n: int, scale: float, seed: int, device: torch.device
) -> tuple[list[nn.Module], list[float]]:
    r"""Copy ``model`` ``n`` times and perturb copies ``1..n-1``.

    Copy ``i`` gets ``W <- W + scale * sigma(W) * xi`` for every trainable tensor, with ``xi`` drawn
    from a private CPU generator seeded ``seed + i`` (`perturb_parameters`: the same draws
    deep-lyapunov makes on CPU). The caller's global RNG is not touched.

    Returns:
        ``(replicas, intended)`` where ``intended[i]`` is the L2 norm of the noise meant for copy ``i``
        (before rounding), for the resolution check.
    """
    try:
        base = copy.deepcopy(model)
    except Exception as exc:  # pragma: no cover - depends on exotic user models
        raise StabwatchError(f"the model cannot be copied with copy.deepcopy: {exc}") from exc
    replicas: list[nn.Module] = []
    intended: list[float] = []
    for i in range(n):
        replica = copy.deepcopy(base) if i < n - 1 else base
        norm = 0.0
        if i > 0:
            norm = perturb_parameters(replica, scale, torch.Generator().manual_seed(seed + i))
        intended.append(norm)
        replicas.append(replica.to(device))
    return replicas, intended


def parameter_version(models: list[nn.Module]) -> int:
    """Sum of the in-place version counters of the trainable parameters (bumped by optimizer steps)."""
    total = 0
    for model in models:
        for _, p in tracked_parameters(model):
            total += int(getattr(p, "_version", 0))
    return total


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy `SeedSequence`), stable across platforms."""
    words = np.random.SeedSequence([int(x) % 2**63 for x in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and all CUDA devices), numpy's global RNG and `random` from one integer."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """Run a block with the global RNGs of torch, numpy and `random` restored afterwards.

    The analysis seeds these RNGs so that every replica sees the same data order and noise; the
    caller's random streams continue as if the analysis had never run.
    """
    torch_state = torch.get_rng_state()
    cuda_states = None
    if device.type == "cuda" and torch.cuda.is_available():
        cuda_states = torch.cuda.get_rng_state_all()
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(np_state)
        random.setstate(py_state)


class LoaderGenerators:
    """The `torch.Generator` objects a data loader shuffles with, snapshotted and restored.

    A `DataLoader` built with ``generator=g`` (or a sampler with its own generator) does not read the
    global RNG; to give every replica the same order the generators are rewound to the state they
    had when the first replica started the epoch.
    """

    def __init__(self, loader: Any) -> None:
        found: list[torch.Generator] = []
        candidates = [
            getattr(loader, "generator", None),
            getattr(getattr(loader, "sampler", None), "generator", None),
            getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
        ]
        for gen in candidates:
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
        self._generators = found
        self._states: list[torch.Tensor] = []

    def snapshot(self) -> None:
        """Remember the current state of every generator."""
        self._states = [g.get_state() for g in self._generators]

    def restore(self) -> None:
        """Rewind every generator to the last snapshot."""
        for g, state in zip(self._generators, self._states):
            g.set_state(state)
