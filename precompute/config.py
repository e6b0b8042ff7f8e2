"""The one typed, frozen configuration of kto-precompute: defaults and validation
live here and nowhere else."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from shared.errors import ConfigError, check_finite, check_seed
from shared.formats import SHAPES
from shared.readers import Subset
from shared.tokenization import TokenizeOptions

BACKENDS = ("auto", "vllm", "hf", "server")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PrecomputeConfig:
    model: str
    data: tuple[str, ...]
    output: str
    # a Hub dataset or dataset repository folder: which config and split (TRL's names:
    # dataset_config, dataset_train_split)
    dataset_config: str | None = None
    dataset_split: str = "train"
    tokenizer: str | None = None  # default: the model's own
    format: str = "auto"
    columns: tuple[str, ...] = ()  # CANONICAL=SOURCE
    backend: str = "auto"
    dtype: str = "float32"
    tokenize: TokenizeOptions = field(default_factory=TokenizeOptions)
    seed: int = 42
    shard_size: int = 1000
    num_workers: int = 1
    worker_index: int = 0
    skip_invalid: bool = False
    overwrite: bool = False
    # transformers backend: padded tokens per forward batch; None = from the device
    batch_tokens: int | None = None
    # vLLM backend
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 1.0
    max_num_batched_tokens: int | None = None  # None = vLLM's default for the device
    # server backend (the API key comes from KTO_SERVER_API_KEY / OPENAI_API_KEY only)
    server_url: str | None = None
    server_model: str | None = None  # None = the server's only model
    max_concurrent_requests: int = 4
    prompts_per_request: int = 8
    server_timeout: float = 300.0  # seconds of retries after a request's first failure

    def __post_init__(self) -> None:
        check_finite(self)
        if self.cpu_kv_cache_gib <= 0:
            raise ConfigError(f"--cpu-kv-cache-gib {self.cpu_kv_cache_gib} must be > 0")
        if not self.data:
            raise ConfigError("give at least one --data path")
        if not self.dataset_split:
            raise ConfigError("--dataset-split must name a split (e.g. train)")
        if self.format != "auto" and self.format not in SHAPES:
            raise ConfigError(f"--format {self.format!r}: expected auto or {', '.join(SHAPES)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}: expected {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: expected {', '.join(DTYPES)}")
        check_seed(self.seed)
        if self.shard_size < 2:
            raise ConfigError(f"--shard-size {self.shard_size}: KL pairing needs at least 2 rows")
        if not 0 <= self.worker_index < self.num_workers:
            raise ConfigError(f"--worker-index {self.worker_index} must be in "
                              f"[0, --num-workers {self.num_workers})")
        if (self.batch_tokens is not None and self.batch_tokens < 1) or \
                self.tensor_parallel_size < 1:
            raise ConfigError("--batch-tokens and --tensor-parallel-size must be positive")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError("--max-num-batched-tokens must be positive")
        self._check_server()
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization {self.gpu_memory_utilization} must be "
                              "in (0, 1]")

    def _check_server(self) -> None:
        if self.backend == "server" and not self.server_url:
            raise ConfigError("--backend server needs --server-url URL (the vLLM server's "
                              "address, e.g. http://host:8000)")
        if self.server_url and self.backend != "server":
            raise ConfigError(f"--server-url is given but --backend is {self.backend!r}; pass "
                              "--backend server to score against the server")
        if self.max_concurrent_requests < 1 or self.prompts_per_request < 1:
            raise ConfigError("--max-concurrent-requests and --prompts-per-request must be "
                              "positive")
        if self.server_timeout <= 0:
            raise ConfigError(f"--server-timeout {self.server_timeout} must be > 0 seconds")

    @property
    def subset(self) -> Subset:
        return Subset(self.dataset_config, self.dataset_split)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
