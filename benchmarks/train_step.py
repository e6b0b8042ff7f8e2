"""Training step time and peak memory: kto-train (policy only, reference from the cache)
vs TRL KTOTrainer with a live reference model vs TRL with `precompute_ref_log_probs`.

Same random model, same token sequences (the cache's, built once here with
kto-precompute), batch size, dtype, learning rate and one epoch each, so every row is
seen once by every trainer (row order differs: kto-train shuffles, TRL's KTO needs
sequential order). Step time = training-loop seconds / steps (TRL: `trainer.train()`,
without its reference precompute, reported apart). Each run is its own process.

    python benchmarks/train_step.py --out runs/bench/train
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.compute as pc

from shared.dataset import open_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ModelShape,
    build_model,
    checked,
    command_line,
    data_slice,
    fmt,
    machine,
    measure,
    spread,
    table,
    write,
)

MODES = ("kto-train", "trl-live", "trl-precompute")
# Forward-equivalents per row (backward = 2 forwards): target fwd+bwd, KL fwd, and with a
# live reference the reference's target and KL forwards.
FORWARDS = {"kto-train": 4, "trl-live": 6, "trl-precompute": 4}


def build_cache(model: Path, data: list[str], out: Path, args) -> Path:
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "precompute.cli", "--model", str(model), "--output",
               str(out), "--backend", "hf", "--dtype", args.dtype, "--max-length",
               str(args.max_length), "--max-prompt-length", str(args.max_length // 2),
               "--overwrite", *[a for d in data for a in ("--data", d)]]
        checked(measure(cmd), "kto-precompute")
    return out


def cache_stats(cache: Path) -> dict[str, float]:
    t = open_cache(cache).table  # every shard, checksums verified
    n = t.num_rows
    mean = {c: pc.sum(pc.list_value_length(t[c])).as_py() / n
            for c in ("prompt_ids", "completion_ids", "kl_completion_ids")}
    return {"rows": n, "target_tokens_per_row": mean["prompt_ids"] + mean["completion_ids"],
            "kl_tokens_per_row": mean["prompt_ids"] + mean["kl_completion_ids"]}


def kto_train(model: Path, cache: Path, out: Path, beta: float, args) -> dict:
    cmd = [sys.executable, "-m", "train.cli", "--model", str(model), "--cache", str(cache),
           "--output", str(out), "--num-train-epochs", "1", "--per-device-train-batch-size",
           str(args.batch_size), "--learning-rate", str(args.learning_rate), "--beta",
           str(beta), "--no-group-by-length", "--logging-steps", "1000", "--seed", "0"]
    if args.dtype == "bfloat16":
        cmd.append("--bf16")
    m = checked(measure(cmd), "kto-train")
    s = json.loads(m.stdout[m.stdout.index("{"):])
    return {"steps": s["steps_run"], "train_seconds": s["train_seconds"],
            "seconds_per_step": s["train_seconds"] / s["steps_run"],
            "wall_seconds": round(m.seconds, 2), "peak_rss_gib": round(m.peak_rss_gib, 3)}


def trl(model: Path, cache: Path, mode: str, steps: int, beta: float, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).parent / "trl_kto.py"), "--model", str(model),
           "--cache", str(cache), "--mode", mode, "--batch-size", str(args.batch_size),
           "--max-steps", str(steps), "--learning-rate", str(args.learning_rate),
           "--beta", str(beta)]
    if args.dtype == "bfloat16":
        cmd.append("--bf16")
    m = checked(measure(cmd), f"TRL {mode}")
    s = json.loads(m.stdout.strip().splitlines()[-1])
    return {"steps": s["steps"], "train_seconds": s["train_seconds"],
            "seconds_per_step": s["seconds_per_step"],
            "precompute_seconds": s["precompute_seconds"],
            "keeps_reference_model": s["keeps_reference_model"],
            "wall_seconds": round(m.seconds, 2), "peak_rss_gib": round(m.peak_rss_gib, 3)}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--records", type=int, default=16, help="first N records of each file")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=ModelShape.layers)
    ap.add_argument("--hidden", type=int, default=ModelShape.hidden)
    ap.add_argument("--vocab", type=int, default=ModelShape.vocab)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--modes", default=",".join(MODES), help="a subset of " + ",".join(MODES))


def setup(args) -> tuple[ModelShape, Path, Path]:
    shape = ModelShape(layers=args.layers, hidden=args.hidden, vocab=args.vocab)
    model = build_model(args.out.parent / f"model-{shape.layers}x{shape.hidden}-{shape.vocab}",
                        shape)
    data = data_slice(args.out / "data", args.records)
    cache = build_cache(model, data, args.out / "cache", args)
    return shape, model, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap)
    args = ap.parse_args()
    shape, model, cache = setup(args)
    stats = cache_stats(cache)
    steps = stats["rows"] // args.batch_size
    info = machine(args.dtype)
    peak = info[f"gemm_peak_gflops_{args.dtype}"] * 1e9

    modes = [m for m in MODES if m in args.modes.split(",")]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(args.reps):
        for m in modes:
            runs[m].append(kto_train(model, cache, args.out / f"policy-{rep}", 0.1, args)
                           if m == "kto-train" else
                           trl(model, cache, m.removeprefix("trl-"), steps, 0.1, args))
        for m in modes:
            r = runs[m][-1]
            print(f"rep {rep} {m}: {r['seconds_per_step']:.3f} s/step, "
                  f"{r['peak_rss_gib']:.2f} GiB", flush=True)

    bytes_per = 2 if args.dtype == "bfloat16" else 4
    ref_gib = shape.parameters()["total"] * bytes_per / 2**30
    summary, rows = {}, []
    for m in modes:
        rs = runs[m]
        s = {"seconds_per_step": spread([r["seconds_per_step"] for r in rs], 3),
             "peak_rss_gib": spread([r["peak_rss_gib"] for r in rs], 3),
             "wall_seconds": spread([r["wall_seconds"] for r in rs], 1)}
        if m == "trl-precompute":
            s["precompute_seconds"] = spread([r["precompute_seconds"] for r in rs], 1)
        summary[m] = s
    live = summary.get("trl-live")
    for m in modes:
        s = summary[m]
        if m == "trl-live":
            tokens = args.batch_size * (4 * stats["target_tokens_per_row"]
                                        + 2 * stats["kl_tokens_per_row"])
        else:
            tokens = args.batch_size * (3 * stats["target_tokens_per_row"]
                                        + stats["kl_tokens_per_row"])
        util = tokens * shape.flops_per_token() / s["seconds_per_step"]["median"] / peak
        ratio = (f"{s['seconds_per_step']['median'] / live['seconds_per_step']['median']:.2f}x"
                 if live else "")
        mem = (f"{s['peak_rss_gib']['median'] - live['peak_rss_gib']['median']:+.2f}"
               if live and m != "trl-live" else "")
        rows.append([m, fmt(s["seconds_per_step"], 2), ratio, FORWARDS[m],
                     f"{100 * util:.0f}%", fmt(s["peak_rss_gib"], 2), mem,
                     fmt(s.get("precompute_seconds", {"median": 0, "min": 0, "max": 0}), 1)
                     if m == "trl-precompute" else ""])
    md = (f"`{command_line()}`: {stats['rows']} rows (first {args.records} records of each "
          f"real file, truncated to {args.max_length} tokens; mean "
          f"{stats['target_tokens_per_row']:.0f} target + {stats['kl_tokens_per_row']:.0f} KL "
          f"tokens per row), batch {args.batch_size}, {steps} steps (one epoch), {args.dtype}, "
          f"{shape.layers}x{shape.hidden} Llama with vocabulary {shape.vocab} "
          f"({shape.parameters()['total'] / 1e6:.1f}M parameters; reference weights "
          f"{ref_gib:.2f} GiB), {args.reps} repetitions, median (min-max). Share of FLOP "
          f"limit: useful forward-equivalent FLOPs per step (padding excluded) / step time / "
          f"measured GEMM peak ({info[f'gemm_peak_gflops_{args.dtype}']} GFLOP/s).\n\n")
    md += table(["trainer", "s/step", "vs TRL live", "forward-equivalents per row",
                 "of FLOP limit", "peak RSS GiB", "RSS vs TRL live (GiB)",
                 "TRL reference precompute s"], rows)
    result = {"command": command_line(), "machine": info, "shape": shape, "data": stats,
              "steps": steps, "reference_weights_gib": ref_gib,
              "args": vars(args) | {"out": str(args.out)}, "runs": runs, "summary": summary}
    write(args.out, "train_step", result, md)


if __name__ == "__main__":
    main()
