"""Runs in a fresh process (no cached CUDA answers from earlier tests, e.g. transformers'
lru_cached is_torch_cuda_available): the whole kto-precompute path up to vLLM's LLM(), on
a pretend-GPU machine, with every torch.cuda entry point wired to a tripwire. Prints what
the fake engine saw as JSON.

usage: python cuda_tripwire_driver.py MODEL DATA OUTPUT current|old-check"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from collections.abc import Callable

import torch

# Every torch.cuda entry point that creates a context or registers the fork poisoning
CUDA_CALLS = ("is_available", "device_count", "init", "_lazy_init", "current_device",
              "set_device", "get_device_properties", "get_device_name",
              "get_device_capability", "mem_get_info", "memory_allocated",
              "max_memory_allocated", "reset_peak_memory_stats", "synchronize",
              "is_bf16_supported", "empty_cache")


class EngineStarted(Exception):
    """Raised by the fake engine once it has recorded what it saw."""


def cuda_tripwire(setattr_: Callable = setattr) -> list[str]:
    """Wrap every CUDA entry point (and torch's C device count, on CUDA builds) so that
    each call is recorded."""
    calls: list[str] = []
    targets = [(torch.cuda, name) for name in CUDA_CALLS]
    if hasattr(torch._C, "_cuda_getDeviceCount"):
        targets.append((torch._C, "_cuda_getDeviceCount"))
    for owner, name in targets:
        original = getattr(owner, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr_(owner, name, wrapper)
    return calls


def fake_vllm(setitem: Callable, calls: list[str], on_cpu: bool) -> dict:
    """A vllm package whose platform says GPU (or CPU) and whose LLM records the CUDA
    calls made before it was constructed, then stops the run. ``setitem(name, module)``
    installs a module (sys.modules.__setitem__, or pytest's monkeypatch)."""
    seen: dict = {}

    class LLM:
        def __init__(self, **kwargs):
            seen["cuda_calls_before_engine"] = list(calls)
            seen["cuda_initialized"] = torch.cuda.is_initialized()
            seen["enforce_eager"] = kwargs.get("enforce_eager")
            raise EngineStarted

    modules = {"vllm": types.ModuleType("vllm"),
               "vllm.platforms": types.ModuleType("vllm.platforms")}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        setitem(name, module)
    modules["vllm"].LLM = LLM
    modules["vllm"].platforms = modules["vllm.platforms"]
    modules["vllm.platforms"].current_platform = types.SimpleNamespace(is_cpu=lambda: on_cpu)
    return seen


def main(model: str, data: str, output: str, mode: str) -> None:
    from precompute.config import PrecomputeConfig
    from precompute.run import run
    from precompute.scoring import vllm_backend
    from shared.tokenization import TokenizeOptions

    torch.backends.cuda.is_built = lambda: True  # a CUDA build of torch
    calls = cuda_tripwire()
    seen = fake_vllm(sys.modules.__setitem__, calls, on_cpu=False)
    if mode == "old-check":  # what kto-precompute asked before the fix
        vllm_backend._on_cpu = lambda: not torch.cuda.is_available()
    config = PrecomputeConfig(model=model, data=(data,), output=output, backend="auto",
                              tokenize=TokenizeOptions(256, 128))
    try:
        run(config)
    except EngineStarted:
        pass
    print(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:5])
