"""Where a base model's weights are: one device, or spread by accelerate's device map (several
GPUs, CPU, disk offload). Code that reads weights directly (slicing, scores, reformation) goes
through `onloaded`, and code that runs blocks one by one moves its activations to
`execution_device`, so `--device auto` computes exactly what one device computes."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _hook(module: nn.Module):
    return getattr(module, "_hf_hook", None)


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on: accelerate's execution device, else its parameters'."""
    for m in (module, *module.modules()):
        dev = getattr(_hook(m), "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _offloaded_parts(module: nn.Module) -> list[nn.Module]:
    """The module and submodules whose weights accelerate keeps off memory (disk offload hooks sit
    on the leaf layers, CPU offload on the mapped module)."""
    return [m for m in module.modules() if getattr(_hook(m), "offload", False)]


def is_offloaded(module: nn.Module) -> bool:
    return bool(_offloaded_parts(module))


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """The module with real weights on its execution device for the duration (accelerate keeps an
    offloaded module's weights on `meta` between its forwards); a no-op for plain modules."""
    parts = _offloaded_parts(module)
    if not parts:
        yield module
        return
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for m in parts:
            stack.enter_context(align_module_device(m))
        yield module


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate spread the model over several devices (a device map)."""
    return bool(getattr(model, "hf_device_map", None)) and len(set(model.hf_device_map.values())) > 1


__all__ = ["execution_device", "is_offloaded", "onloaded", "is_dispatched"]
