"""Backend agreement and throughput of kto-precompute on this machine.

Builds a random Llama of the given shape (with the tests' local tokenizer), runs
`kto-precompute` once per backend on the given data (each in its own process, as a
user would), then compares the two caches row by row and both against the naive
one-sequence-at-a-time float64 oracle on a sample.

    python benchmarks/backends.py --layers 2 --hidden 64 --out runs/agree-tiny
    python benchmarks/backends.py --layers 6 --hidden 512 --vocab 16384 \
        --data ../shared/data/kto_en_demo.json --out runs/speed-6x512
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import naive_logps  # noqa: E402
from tiny import SHARED_DATA, save_tiny  # noqa: E402

from shared.dataset import open_cache  # noqa: E402


def precompute(model: Path, data: list[str], out: Path, backend: str, args) -> dict:
    cmd = [sys.executable, "-m", "precompute.cli", "--model", str(model), "--output", str(out),
           "--backend", backend, "--dtype", args.dtype, "--max-length", str(args.max_length),
           "--overwrite", *[a for d in data for a in ("--data", d)]]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    summary = json.loads(proc.stdout)
    summary["wall_seconds_with_startup"] = round(time.monotonic() - t0, 1)
    return summary


def diffs(a, b) -> dict:
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return {"max": float(d.max()), "mean": float(d.mean()), "n": int(d.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--data", action="append", default=None)
    ap.add_argument("--naive-sample", type=int, default=40)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    data = args.data or [str(SHARED_DATA / "kto_en_demo.json"),
                         str(SHARED_DATA / "dpo_en_demo.json")]
    model = save_tiny(args.out / "model", layers=args.layers, hidden=args.hidden,
                      vocab_size=args.vocab)
    runs = {b: precompute(model, data, args.out / f"cache-{b}", b, args) for b in ("hf", "vllm")}
    hf, vl = open_cache(args.out / "cache-hf").table, open_cache(args.out / "cache-vllm").table
    result = {"machine": platform.processor() or platform.machine(), "args": vars(args) | {
        "out": str(args.out)}, "runs": runs, "agreement": {}}
    for col in ("ref_logps", "ref_kl_logps"):
        result["agreement"][f"vllm_vs_hf_{col}"] = diffs(vl[col], hf[col])
    if args.dtype == "float32" and args.naive_sample:
        import torch
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        idx = np.linspace(0, hf.num_rows - 1, args.naive_sample).astype(int).tolist()
        rows = hf.take(idx).to_pylist()
        naive = naive_logps(ref, [(r["prompt_ids"], r["completion_ids"]) for r in rows])
        result["agreement"]["hf_vs_naive"] = diffs(hf.take(idx)["ref_logps"], naive)
        result["agreement"]["vllm_vs_naive"] = diffs(vl.take(idx)["ref_logps"], naive)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
