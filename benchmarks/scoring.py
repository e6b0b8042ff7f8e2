"""Reference scoring throughput and peak memory: kto-precompute's vLLM and transformers
backends vs TRL KTOTrainer's in-process precompute (`precompute_ref_log_probs=True`),
on the same random model and the same token sequences from the real demo data.

Each repetition runs every backend in its own process, as a user would. Throughput is
scored tokens (prompt + completion, for the target and the KL sequence of each row)
over the scoring phase only; wall time with start-up is reported beside it. TRL scores
the hf cache's sequences of the same repetition and its values are compared with it.

    python benchmarks/scoring.py --data DATA --out runs/bench/scoring
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from shared.dataset import open_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_model_args,
    checked,
    command_line,
    data_files,
    data_slice,
    fmt,
    machine,
    measure,
    resolve_model,
    spread,
    table,
    write,
)

BACKENDS = ("vllm", "hf", "trl")


def cache_values(cache: Path) -> dict[str, np.ndarray]:
    t = open_cache(cache, columns=["ref_logps", "ref_kl_logps"]).table
    return {c: t[c].to_numpy() for c in ("ref_logps", "ref_kl_logps")}


def run_precompute(backend: str, model: Path, data: list[str], out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "precompute.cli", "--model", str(model), "--output", str(out),
           "--backend", backend, "--dtype", args.dtype, "--max-length", str(args.max_length),
           "--overwrite", *[a for d in data for a in ("--data", d)]]
    m = checked(measure(cmd), f"kto-precompute --backend {backend}")
    s = json.loads(m.stdout)
    return {"tokens": s["tokens_scored_now"], "rows": s["rows"],
            "scoring_seconds": s["scoring_seconds"], "wall_seconds": round(m.seconds, 2),
            "peak_rss_gib": round(m.peak_rss_gib, 3)}


def run_trl(model: Path, cache: Path, tokens: int, args, dump: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).parent / "trl_kto.py"), "--model", str(model),
           "--cache", str(cache), "--mode", "precompute-only", "--batch-size",
           str(args.trl_batch_size), "--dump", str(dump)]
    if args.dtype == "bfloat16":  # bf16 weights, as kto-precompute --dtype bfloat16
        cmd += ["--torch-dtype", "bfloat16", "--bf16"]
    m = checked(measure(cmd), "TRL precompute")
    s = json.loads(m.stdout.strip().splitlines()[-1])
    return {"tokens": tokens, "rows": s["rows"], "scoring_seconds": s["precompute_seconds"],
            "wall_seconds": round(m.seconds, 2), "peak_rss_gib": round(m.peak_rss_gib, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--records", type=int, default=24, help="first N records of each file")
    ap.add_argument("--reps", type=int, default=3)
    add_model_args(ap)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--trl-batch-size", type=int, default=8)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    args = ap.parse_args()
    backends = args.backends.split(",")
    model, shape = resolve_model(args, args.out.parent)
    data = data_slice(args.out / "data", args.records, data_files(args.data))
    info = machine(args.dtype)
    limit = info[f"gemm_peak_gflops_{args.dtype}"] * 1e9 / shape.flops_per_token()

    runs: dict[str, list[dict]] = {b: [] for b in backends}
    agreement: dict[str, list[float]] = {}
    for rep in range(args.reps):
        for backend in backends:
            if backend == "trl":
                hf_cache = args.out / f"cache-hf-{rep}"
                tokens = runs["hf"][-1]["tokens"]
                dump = args.out / f"trl-{rep}.json"
                runs["trl"].append(run_trl(model, hf_cache, tokens, args, dump))
                theirs, ours = json.loads(dump.read_text()), cache_values(hf_cache)
                for col in ours:
                    d = float(np.abs(np.asarray(theirs[col]) - ours[col]).max())
                    agreement.setdefault(f"trl_vs_hf_{col}", []).append(d)
            else:
                out = args.out / f"cache-{backend}-{rep}"
                runs[backend].append(run_precompute(backend, model, data, out, args))
            r = runs[backend][-1]
            print(f"rep {rep} {backend}: {r['tokens'] / r['scoring_seconds']:.0f} tok/s, "
                  f"{r['peak_rss_gib']:.2f} GiB", flush=True)
        if "vllm" in runs and "hf" in runs:
            v, h = (cache_values(args.out / f"cache-{b}-{rep}") for b in ("vllm", "hf"))
            for col in v:
                agreement.setdefault(f"vllm_vs_hf_{col}", []).append(
                    float(np.abs(v[col] - h[col]).max()))

    summary = {}
    for b, rs in runs.items():
        rates = [r["tokens"] / r["scoring_seconds"] for r in rs]
        summary[b] = {"tokens_per_second": spread(rates, 1),
                      "scoring_seconds": spread([r["scoring_seconds"] for r in rs]),
                      "wall_seconds": spread([r["wall_seconds"] for r in rs]),
                      "peak_rss_gib": spread([r["peak_rss_gib"] for r in rs]),
                      "tokens": rs[0]["tokens"], "rows": rs[0]["rows"]}
    names = {"vllm": "kto-precompute, vLLM", "hf": "kto-precompute, transformers",
             "trl": f"TRL precompute (batch {args.trl_batch_size})"}
    rows = []
    for b, s in summary.items():
        med = s["tokens_per_second"]["median"]
        vs_trl = (f"{med / summary['trl']['tokens_per_second']['median']:.2f}x"
                  if "trl" in summary else "")
        rows.append([names[b], fmt(s["tokens_per_second"], 0), vs_trl,
                     f"{100 * med / limit:.0f}%", fmt(s["wall_seconds"], 1),
                     fmt(s["peak_rss_gib"], 2)])
    md = (f"`{command_line()}`: {summary[backends[0]]['rows']} rows, "
          f"{summary[backends[0]]['tokens']} tokens scored per run, {args.dtype}, "
          f"{shape.describe()} ({shape.parameters()['total'] / 1e6:.1f}M parameters, "
          f"{shape.flops_per_token() / 1e6:.1f} MFLOP/token), {args.reps} repetitions, "
          f"median (min-max). FLOP limit: measured GEMM peak "
          f"{info[f'gemm_peak_gflops_{args.dtype}']} GFLOP/s / (2 x non-embedding parameters) "
          f"= {limit:.0f} tokens/s.\n\n")
    md += table(["scorer", "tokens/s (scoring phase)", "vs TRL", "of FLOP limit",
                 "wall s (with start-up)", "peak RSS GiB (process tree)"], rows)
    if agreement:
        md += "\nmax |difference| (nats) over all rows and repetitions: " + ", ".join(
            f"{k} {max(v):.2e}" for k, v in agreement.items()) + "\n"
    result = {"command": command_line(), "machine": info, "shape": shape,
              "flops_per_token": shape.flops_per_token(), "flop_limit_tokens_per_second": limit,
              "args": vars(args) | {"out": str(args.out)}, "runs": runs, "summary": summary,
              "agreement_max": {k: max(v) for k, v in agreement.items()}}
    write(args.out, "scoring", result, md)


if __name__ == "__main__":
    main()
