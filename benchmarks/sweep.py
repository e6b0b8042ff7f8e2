"""The sweep the cache is for: K training runs that differ only in beta on one dataset.
kto-cache: one kto-precompute + K kto-train runs; TRL: K KTOTrainer runs with a live
reference model. Total wall time of each (every command in its own process, start-up
included), same model, sequences, batch size and one epoch per run as
benchmarks/train_step.py.

    python benchmarks/sweep.py --data DATA --out runs/bench/sweep
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
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
from train_step import add_args, cache_stats, kto_train, trl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap)
    ap.add_argument("--betas", default="0.05,0.1,0.2,0.5")
    ap.add_argument("--backend", default="auto", help="kto-precompute --backend")
    args = ap.parse_args()
    betas = [float(b) for b in args.betas.split(",")]
    model, shape = resolve_model(args, args.out.parent)
    data = data_slice(args.out / "data", args.records, data_files(args.data))

    totals: dict[str, list[float]] = {"kto-cache": [], "trl-live": []}
    parts: list[dict] = []
    for rep in range(args.reps):
        cache = args.out / f"cache-{rep}"
        cmd = [sys.executable, "-m", "precompute.cli", "--model", str(model), "--output",
               str(cache), "--backend", args.backend, "--dtype", args.dtype, "--max-length",
               str(args.max_length), "--max-prompt-length", str(args.max_length // 2),
               "--overwrite", *[a for d in data for a in ("--data", d)]]
        pre = checked(measure(cmd), "kto-precompute").seconds
        steps = cache_stats(cache)["rows"] // args.batch_size
        ours = [kto_train(model, cache, args.out / f"policy-{rep}-{b}", b, args)["wall_seconds"]
                for b in betas]
        theirs = [trl(model, cache, "live", steps, b, args)["wall_seconds"] for b in betas]
        totals["kto-cache"].append(pre + sum(ours))
        totals["trl-live"].append(sum(theirs))
        parts.append({"precompute": round(pre, 2), "kto_train": ours, "trl_live": theirs})
        print(f"rep {rep}: kto-cache {totals['kto-cache'][-1]:.1f} s "
              f"(precompute {pre:.1f}), TRL live {totals['trl-live'][-1]:.1f} s", flush=True)

    ours, theirs = spread(totals["kto-cache"], 1), spread(totals["trl-live"], 1)
    pre = spread([p["precompute"] for p in parts], 1)
    per_ours = spread([t for p in parts for t in p["kto_train"]], 1)
    per_theirs = spread([t for p in parts for t in p["trl_live"]], 1)
    k = len(betas)
    md = (f"`{command_line()}`: betas {betas}, {steps} steps per run (one epoch), "
          f"{shape.describe()}, kto-precompute --backend {args.backend}, settings "
          f"{args.settings}, other settings as the step-time table; "
          f"{args.reps} repetitions, median (min-max), seconds.\n\n")
    md += table(["pipeline", f"total for K={k}", "per training run", "one-off precompute",
                 "vs TRL"],
                [[f"kto-precompute + {k} x kto-train", fmt(ours, 1), fmt(per_ours, 1),
                  fmt(pre, 1), f"{ours['median'] / theirs['median']:.2f}x"],
                 [f"{k} x TRL KTOTrainer (live reference)", fmt(theirs, 1), fmt(per_theirs, 1),
                  "", "1.00x"]])
    result = {"command": command_line(), "machine": machine(args.dtype), "shape": shape,
              "args": vars(args) | {"out": str(args.out)}, "betas": betas, "parts": parts,
              "totals": totals, "summary": {"kto-cache": ours, "trl-live": theirs}}
    write(args.out, "sweep", result, md)


if __name__ == "__main__":
    main()
