"""Backend agreement of kto-precompute (accuracy, not speed): vLLM vs transformers vs
the naive one-sequence-at-a-time float64 oracle, per sequence sum and per token, and
bfloat16 drift against float32.

Runs `kto-precompute` once per backend and dtype on the given data (each in its own
process, as a user would), compares the caches row by row, compares both float32 caches
with the oracle on a sample of rows, and vLLM's per-token values with the oracle's on a
smaller sample (benchmarks/vllm_tokens.py, in its own process). A cache already in
--out with the same settings is reused (kto-precompute resumes): a rerun scores only
what is missing.

    python benchmarks/backends.py --data DATA --real-model --records 32 --out runs/agree-smollm2
    python benchmarks/backends.py --data DATA --layers 2 --hidden 64 --out runs/agree-tiny
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

from common import ModelShape, add_data_arg, data_files, data_slice, table, tokenizer_corpus  # noqa: E402,I001

from shared.dataset import open_cache  # noqa: E402

BACKENDS = ("hf", "vllm")
COLUMNS = ("ref_logps", "ref_kl_logps")


def precompute(model: Path, data: list[str], out: Path, backend: str, dtype: str,
               args) -> dict:
    cmd = [sys.executable, "-m", "precompute.cli", "--model", str(model), "--output", str(out),
           "--backend", backend, "--dtype", dtype, "--max-length", str(args.max_length),
           *[a for d in data for a in ("--data", d)]]  # a complete cache is reused (resume)
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed; see {out.parent / f'{out.name}.log'}")
    return json.loads(proc.stdout)


def diffs(a, b) -> dict:
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return {"max": float(d.max()), "mean": float(d.mean()), "median": float(np.median(d)),
            "n": int(d.size)}


def signed(a, b) -> dict:
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return diffs(a, b) | {"mean_signed": float(d.mean())}


def naive_tokens(model_dir: Path, pairs) -> list[np.ndarray]:
    """One sequence at a time, no padding, full float32 logits, float64 log-softmax (on
    the GPU where there is one)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    out = []
    with torch.no_grad():
        for p, c in pairs:
            ids = torch.tensor([list(p) + list(c)], device=device)
            logp = torch.log_softmax(model.eval()(input_ids=ids).logits[0].double(), dim=-1)
            out.append(logp[len(p) - 1:-1].gather(-1, ids[0, len(p):, None])[:, 0].cpu().numpy())
    return out


def vllm_tokens(model: Path, pairs, work: Path, dtype: str = "float32") -> list[np.ndarray]:
    """vLLM's per-token values in its own process (benchmarks/vllm_tokens.py)."""
    pairs_file, out, log_file = (work / f"token-{name}" for name in
                                 ("pairs.json", f"vllm-{dtype}.json", f"vllm-{dtype}.log"))
    pairs_file.write_text(json.dumps(pairs))
    cmd = [sys.executable, str(Path(__file__).parent / "vllm_tokens.py"), str(model), dtype,
           str(pairs_file), str(out)]
    with open(log_file, "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=log, cwd=ROOT).returncode != 0:
            sys.exit(f"vllm_tokens.py failed; see {log_file}")
    return [np.array(t) for t in json.loads(out.read_text())]


def sample(n_rows: int, k: int) -> list[int]:
    return sorted(set(np.linspace(0, n_rows - 1, k).astype(int).tolist())) if k else []


def float32_agreement(caches: dict, model: Path, args) -> dict:
    hf, vl = caches[("hf", "float32")], caches[("vllm", "float32")]
    out = {f"vllm_vs_hf_{c}": diffs(vl[c], hf[c]) for c in COLUMNS}
    idx = sample(hf.num_rows, args.naive_sample)
    pairs = [(r["prompt_ids"], r["completion_ids"]) for r in hf.take(idx).to_pylist()]
    naive = naive_tokens(model, pairs)
    sums = [float(t.sum()) for t in naive]
    out["hf_vs_naive"] = diffs(hf.take(idx)["ref_logps"], sums)
    out["vllm_vs_naive"] = diffs(vl.take(idx)["ref_logps"], sums)
    k = min(args.token_sample, len(pairs))
    if k:
        vt = vllm_tokens(model, pairs[:k], args.out)
        out["vllm_vs_naive_per_token"] = signed(np.concatenate(vt), np.concatenate(naive[:k]))
        out["vllm_vs_naive_per_token"]["sequence_lengths"] = [len(t) for t in vt]
    return out


def bf16_drift(caches: dict) -> dict:
    ref = caches[("hf", "float32")]
    return {f"{b}_bf16_vs_hf_float32_{c}": diffs(caches[(b, "bfloat16")][c], ref[c])
            for b in BACKENDS if (b, "bfloat16") in caches for c in COLUMNS}


def markdown(result: dict) -> str:
    names = {"vllm_vs_hf_ref_logps": "vLLM vs transformers, `ref_logps`",
             "vllm_vs_hf_ref_kl_logps": "vLLM vs transformers, `ref_kl_logps`",
             "hf_vs_naive": "transformers vs naive float64 oracle, `ref_logps`",
             "vllm_vs_naive": "vLLM vs naive float64 oracle, `ref_logps`",
             "vllm_vs_naive_per_token": "vLLM vs naive, per completion token"}
    rows = [[names.get(k, k.replace("_", " ")), v["n"], f"{v['max']:.2e}", f"{v['mean']:.2e}",
             f"{v['median']:.2e}"] for k, v in result["agreement"].items()]
    md = table(["float32 comparison", "values", "max abs diff (nats)", "mean", "median"], rows)
    if result["bf16_drift"]:
        rows = [[k.replace("_bf16_vs_hf_float32_", " bf16 vs transformers float32, `") + "`",
                 v["n"], f"{v['max']:.2f}", f"{v['mean']:.2f}", f"{v['median']:.2f}"]
                for k, v in result["bf16_drift"].items()]
        md += "\n" + table(["bfloat16 drift", "rows", "max abs diff (nats)", "mean", "median"],
                           rows)
    return md


def resolve(args, files: list[Path]) -> Path:
    if args.real_model:
        from train.real_model import materialize

        return materialize()
    if args.model_dir:
        return args.model_dir
    from train import demo

    return demo.save_model(args.out / "model", tokenizer_corpus(files), layers=args.layers,
                           hidden=args.hidden, vocab_size=args.vocab)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real-model", action="store_true",
                    help="SmolLM2-135M-Instruct (make real-model) instead of a random model")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--bf16-backends", default="hf,vllm",
                    help="backends to run in bfloat16 (float32 always runs both)")
    ap.add_argument("--max-length", type=int, default=1024)
    add_data_arg(ap)
    ap.add_argument("--records", type=int, default=0,
                    help="first N records of each demo file (0: all)")
    ap.add_argument("--naive-sample", type=int, default=40)
    ap.add_argument("--token-sample", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = data_files(args.data)
    data = (data_slice(args.out / "data", args.records, files) if args.records else
            [str(f) for f in files])
    model = resolve(args, files)
    dtypes = args.dtypes.split(",")
    runs, caches = {}, {}
    for dtype in dtypes:
        for b in BACKENDS if dtype == "float32" else args.bf16_backends.split(","):
            out = args.out / f"cache-{b}-{dtype}"
            runs[f"{b}-{dtype}"] = precompute(model, data, out, b, dtype, args)
            caches[(b, dtype)] = open_cache(out).table.sort_by("id")  # rows matched by id
            print(f"{b} {dtype}: {runs[f'{b}-{dtype}']['rows']} rows", flush=True)
    result = {"model": str(model), "shape": ModelShape.from_config(model).describe(),
              "data": data, "args": vars(args) | {"out": str(args.out)}, "runs": runs,
              "agreement": float32_agreement(caches, model, args) if "float32" in dtypes else {},
              "bf16_drift": bf16_drift(caches) if "float32" in dtypes else {}}
    (args.out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    md = markdown(result)
    (args.out / "result.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
