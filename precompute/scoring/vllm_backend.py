"""vLLM scorer: offline ``LLM`` on token-id prompts with ``prompt_logprobs=0``,
``max_tokens=1``, no detokenization and no prefix caching (cached prompt tokens
would get no log-probs). The cheapest prompt-logprob path the installed vLLM offers:
the selected-token API (``prompt_logprob_token_ids``, Model Runner V2 only) where it
runs; else ``flat_logprobs`` (one flat list per request instead of a dict and a
``Logprob`` object per token), summed without a Python loop per token; else the
per-token dicts.

CUDA must not be initialized in this process before ``LLM`` starts: vLLM forks its
engine process, and a CUDA context (even ``torch.cuda.is_available()``, which
registers torch's fork poisoning) makes the child fail with "Cannot re-initialize
CUDA in forked subprocess". So nothing here touches ``torch.cuda``: where vLLM runs
is asked of vLLM's platform detection (NVML)."""

from __future__ import annotations

import gc
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from precompute.scoring import Pair
from shared.errors import ConfigError

log = logging.getLogger(__name__)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform  # NVML: no CUDA context, no fork poisoning

    return current_platform.is_cpu()


def cpu_env_defaults(kv_cache_gib: float) -> dict[str, str]:
    """Settings vLLM's CPU build needs here, applied only where the user set none:
    an explicit KV cache size (its memory check fails otherwise) and all cores."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib))),
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}


def selected_request(pair: Pair) -> dict[str, Any]:
    """SamplingParams fields that score exactly the completion tokens: row i predicts
    prompt token start + i + 1, so start at the last prompt position."""
    prompt, completion = pair
    return {"prompt_logprob_start": len(prompt) - 1,
            "prompt_logprob_token_ids": [[t] for t in completion]}


def sum_selected(output: Any) -> float:
    return float(np.asarray(output.prompt_token_id_logprobs, dtype=np.float64)[:, 0].sum())


def sum_prompt_logprobs(output: Any, pair: Pair) -> float:
    """Sum the actual token's log-prob over the completion positions of
    ``output.prompt_logprobs`` (entry t: {ids[t]: Logprob}; entry 0 is None)."""
    prompt, completion = pair
    entries = output.prompt_logprobs
    if hasattr(entries, "start_indices"):
        flat = sum_flat_logprobs(entries, len(prompt), completion)
        if flat is not None:
            return flat
    start = len(prompt)
    return float(sum(entries[start + i][tok].logprob for i, tok in enumerate(completion)))


def sum_flat_logprobs(flat: Any, start: int, completion: Sequence[int]) -> float | None:
    """The same sum from a ``FlatLogprobs`` container: with ``prompt_logprobs=0`` every
    position holds exactly its actual token, so the completion's values are one
    contiguous slice. None when the slice is not exactly the completion's tokens (the
    caller then looks them up position by position)."""
    lo, hi = flat.start_indices[start], flat.end_indices[start + len(completion) - 1]
    if hi - lo != len(completion) or flat.token_ids[lo:hi] != list(completion):
        return None
    return float(np.sum(np.asarray(flat.logprobs[lo:hi], dtype=np.float64)))


def _has_param(name: str) -> bool:
    from vllm import SamplingParams

    return name in inspect.signature(SamplingParams).parameters


def _drop_warmup_noise(record: logging.LogRecord) -> bool:
    """With skip_tokenizer_init vLLM still warms up chat templating, fails for want of a
    tokenizer, and logs a traceback. We never render chat in vLLM: drop that record."""
    return "Chat template warmup failed" not in record.getMessage()


class VLLMScorer:
    name = "vllm"

    def __init__(self, model_path: str, dtype: str, *, max_model_len: int,
                 tensor_parallel_size: int, gpu_memory_utilization: float,
                 cpu_kv_cache_gib: float, seed: int, max_num_batched_tokens: int | None = None,
                 engine_args: dict[str, Any] | None = None):
        """``engine_args``: more ``LLM`` arguments, or other values for these (the vision
        scorer's tokenizer and per-prompt image limit)."""
        on_cpu = _on_cpu()
        if on_cpu:
            for key, value in cpu_env_defaults(cpu_kv_cache_gib).items():
                os.environ.setdefault(key, value)
        # vLLM leaves socket files in the temp folder; give it a folder we remove on close
        self._rpc_dir = None
        if "VLLM_RPC_BASE_PATH" not in os.environ:
            self._rpc_dir = tempfile.mkdtemp(prefix="kto-vllm-")
            os.environ["VLLM_RPC_BASE_PATH"] = self._rpc_dir
        from vllm import LLM

        logging.getLogger("vllm.renderers.base").addFilter(_drop_warmup_noise)
        args = {"skip_tokenizer_init": True, "dtype": dtype,
                "tensor_parallel_size": tensor_parallel_size,
                "gpu_memory_utilization": gpu_memory_utilization,
                "enable_prefix_caching": False, "max_model_len": max_model_len, "seed": seed,
                # eager on CPU: 15 s start vs 40 s compiled; on GPUs CUDA graphs and
                # torch.compile stay on (vLLM's defaults)
                "enforce_eager": on_cpu,
                **({"max_num_batched_tokens": max_num_batched_tokens}
                   if max_num_batched_tokens else {}), **(engine_args or {})}
        try:
            self.llm = LLM(model=model_path, **args)
        except ValueError as err:  # vLLM reports bad settings (e.g. max_model_len) this way
            raise ConfigError(f"vLLM could not start on {model_path}: {err}") from None
        self.selected = self._selected_api_available()
        self.flat = _has_param("flat_logprobs")
        log.info("vLLM scorer ready (%s)", "selected-token API" if self.selected else
                 "prompt_logprobs API, flat" if self.flat else "prompt_logprobs API")

    def _selected_api_available(self) -> bool:
        if not _has_param("prompt_logprob_token_ids"):
            return False
        config = getattr(getattr(self.llm, "llm_engine", None), "vllm_config", None)
        return bool(getattr(config, "use_v2_model_runner", False))

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[*p, *c]) for p, c in pairs]
        if self.selected:
            params = [SamplingParams(max_tokens=1, detokenize=False, **selected_request(pair))
                      for pair in pairs]
        else:
            flat = {"flat_logprobs": True} if self.flat else {}
            params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, **flat)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if self.selected:
            return np.array([sum_selected(o) for o in outputs], dtype=np.float64)
        return np.array([sum_prompt_logprobs(o, pair) for o, pair in zip(outputs, pairs,
                                                                         strict=True)])

    def close(self) -> None:
        """Ends vLLM's worker processes (they exit when the engine is collected)."""
        del self.llm
        gc.collect()
        if self._rpc_dir is not None:
            os.environ.pop("VLLM_RPC_BASE_PATH", None)
            shutil.rmtree(self._rpc_dir, ignore_errors=True)
