"""What the GPU tables need beyond common.py: the FLOP limit measured with a GEMM on
the device the run uses, the device memory in use while a command runs (nvidia-smi,
so vLLM's engine process counts too), and the Qwen2-0.5B shape, built with random
weights and a byte-level BPE tokenizer trained on the data."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from common import gemm_peak

# Qwen2-0.5B: 24 layers x 896, 14 query / 2 key-value heads, MLP 4864, vocabulary 151936,
# tied embeddings, biases on q/k/v (transformers' Qwen2Config)
QWEN2_05B = {"num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14,
             "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936}


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def device_gemm_peak(dtype: str) -> float:
    """FLOP/s of a square matmul in ``dtype`` on the GPU if there is one (8192^3, best of
    3 trials of 20), else on the CPU (common.gemm_peak)."""
    import torch

    if not on_gpu():
        return gemm_peak(dtype)
    dt, size = getattr(torch, dtype), 8192
    a = torch.randn(size, size, dtype=dt, device="cuda")
    b = torch.randn(size, size, dtype=dt, device="cuda")
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * size**3 * 20 / (time.perf_counter() - t0))
    del a, b
    torch.cuda.empty_cache()
    return best


def _used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return sum(int(v) for v in out.stdout.split()) if out.returncode == 0 else None
    except ValueError:  # "[N/A]" or "[Not Supported]" on some devices
        return None


class DeviceMemory:
    """Peak device memory in use (all GPUs, MiB from nvidia-smi) above the level before
    the block, sampled every 0.25 s: what a command's processes held, vLLM's engine
    included. None without nvidia-smi."""

    def __enter__(self) -> DeviceMemory:
        self.base = _used_mib()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.base is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            used = _used_mib()
            if used is not None:
                self.peak = max(self.peak, used)
            time.sleep(0.25)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def gib(self) -> float | None:
        return None if self.base is None else round((self.peak - self.base) / 1024, 3)


def build_qwen2(directory: Path, corpus: list[str], shape: dict | None = None, seed: int = 0,
                tokenizer_vocab: int = 8192) -> Path:
    """A random Qwen2 of ``shape`` (default QWEN2_05B) with a byte-level BPE tokenizer
    trained on ``corpus`` (its ids are a subset of the model's vocabulary); built once per
    folder."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train import demo

    tokenizer = demo.build_tokenizer(corpus, vocab_size=tokenizer_vocab)
    config = Qwen2Config(**(shape or QWEN2_05B), tie_word_embeddings=True,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def flops_per_token(model_dir: Path) -> dict[str, int]:
    """Parameters of the model in ``model_dir`` (counted on the meta device) and the
    forward FLOPs per token: 2 x (non-embedding parameters + the LM head), the head
    counted even when tied to the embedding, since it is a matmul per token."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    matmul = total - embed.numel() + (head.numel() if head is embed else 0)
    return {"total": total, "flops_per_token": 2 * matmul}
