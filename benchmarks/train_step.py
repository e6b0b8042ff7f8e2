"""Training step time and peak memory: kto-train (policy only, reference from the cache)
vs TRL KTOTrainer with a live reference model vs TRL with `precompute_ref_log_probs`.

Same random model, same token sequences (the cache's, built once here with
kto-precompute), batch size, dtype, learning rate and one epoch each, so every row is
seen once by every trainer (row order differs: kto-train shuffles, TRL's KTO needs
sequential order). Step time = training-loop seconds / steps (TRL: `trainer.train()`,
without its reference precompute, reported apart). Each run is its own process.

    python benchmarks/train_step.py --data DATA --out runs/bench/train
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


def precision_flags(args, tool: str) -> list[str]:
    """``--settings identical``: both tools float32 weights, bf16 autocast only with
    ``--dtype bfloat16``, no gradient checkpointing; ``checkpointed``: the same with
    gradient checkpointing on in both. ``trl-defaults``: TRL with its KTOConfig defaults
    (1.16: bf16 autocast and gradient checkpointing on) and kto-train with the same two
    switched on."""
    if args.settings == "trl-defaults":
        return ["--trl-defaults"] if tool == "trl" else ["--bf16", "--gradient-checkpointing"]
    # kto-train turns bf16 autocast on by default where a CUDA device supports it: off here
    bf16 = ["--bf16"] if args.dtype == "bfloat16" else [] if tool == "trl" else ["--no-bf16"]
    return bf16 + (["--gradient-checkpointing"] if args.settings == "checkpointed"
                   else [] if tool == "trl" else ["--no-gradient-checkpointing"])


def kto_train(model: Path, cache: Path, out: Path, beta: float, args) -> dict:
    cmd = [sys.executable, "-m", "train.cli", "--model", str(model), "--cache", str(cache),
           "--output", str(out), "--num-train-epochs", "1", "--per-device-train-batch-size",
           str(args.batch_size), "--learning-rate", str(args.learning_rate), "--beta",
           str(beta), "--no-group-by-length", "--logging-steps", "1000", "--seed", "0",
           *precision_flags(args, "kto-train")]
    m = checked(measure(cmd), "kto-train")
    s = json.loads(m.stdout[m.stdout.index("{"):])
    resolved = json.loads((out / "train_config.json").read_text())
    return {"steps": s["steps_run"], "train_seconds": s["train_seconds"],
            "seconds_per_step": s["train_seconds"] / s["steps_run"],
            "wall_seconds": round(m.seconds, 2), "peak_rss_gib": round(m.peak_rss_gib, 3),
            "settings": {"weights_dtype": resolved.get("torch_dtype", "float32"),
                         "bf16_autocast": resolved.get("bf16"),
                         "gradient_checkpointing": resolved.get("gradient_checkpointing")}}


def trl(model: Path, cache: Path, mode: str, steps: int, beta: float, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).parent / "trl_kto.py"), "--model", str(model),
           "--cache", str(cache), "--mode", mode, "--batch-size", str(args.batch_size),
           "--max-steps", str(steps), "--learning-rate", str(args.learning_rate),
           "--beta", str(beta), *precision_flags(args, "trl")]
    m = checked(measure(cmd), f"TRL {mode}")
    s = json.loads(m.stdout.strip().splitlines()[-1])
    return {"steps": s["steps"], "train_seconds": s["train_seconds"],
            "seconds_per_step": s["seconds_per_step"],
            "precompute_seconds": s["precompute_seconds"],
            "keeps_reference_model": s["keeps_reference_model"], "settings": s["settings"],
            "wall_seconds": round(m.seconds, 2), "peak_rss_gib": round(m.peak_rss_gib, 3)}


def settings_text(s: dict) -> str:
    """What the run resolved: weights dtype / bf16 autocast / gradient checkpointing."""
    return (f"{s['weights_dtype']} / {'bf16' if s['bf16_autocast'] else 'none'} / "
            f"{'on' if s['gradient_checkpointing'] else 'off'}")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--records", type=int, default=16, help="first N records of each file")
    ap.add_argument("--reps", type=int, default=3)
    add_model_args(ap)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="bfloat16: bf16 autocast for both tools (with --settings identical)")
    ap.add_argument("--settings", default="identical",
                    choices=("identical", "checkpointed", "trl-defaults"),
                    help="precision and gradient checkpointing: see precision_flags")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--modes", default=",".join(MODES), help="a subset of " + ",".join(MODES))


def setup(args) -> tuple[ModelShape, Path, Path]:
    model, shape = resolve_model(args, args.out.parent)
    data = data_slice(args.out / "data", args.records, data_files(args.data))
    cache = build_cache(model, data, args.out / "cache", args)
    return shape, model, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap)
    args = ap.parse_args()
    shape, model, cache = setup(args)
    stats = cache_stats(cache)
    steps = stats["rows"] // args.batch_size
    gemm = "bfloat16" if args.dtype == "bfloat16" or args.settings == "trl-defaults" else "float32"
    info = machine(gemm)
    peak = info[f"gemm_peak_gflops_{gemm}"] * 1e9

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

    ref_gib = shape.parameters()["total"] * 4 / 2**30  # float32 weights (bf16 is autocast)
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
        rows.append([m, settings_text(runs[m][0]["settings"]), fmt(s["seconds_per_step"], 2),
                     ratio, FORWARDS[m],
                     f"{100 * util:.0f}%", fmt(s["peak_rss_gib"], 2), mem,
                     fmt(s.get("precompute_seconds", {"median": 0, "min": 0, "max": 0}), 1)
                     if m == "trl-precompute" else ""])
    md = (f"`{command_line()}`: {stats['rows']} rows (first {args.records} records of each "
          f"real file, truncated to {args.max_length} tokens; mean "
          f"{stats['target_tokens_per_row']:.0f} target + {stats['kl_tokens_per_row']:.0f} KL "
          f"tokens per row), batch {args.batch_size}, {steps} steps (one epoch), settings "
          f"{args.settings} (--dtype {args.dtype}), {shape.describe()} "
          f"({shape.parameters()['total'] / 1e6:.1f}M parameters; reference weights "
          f"{ref_gib:.2f} GiB), {args.reps} repetitions, median (min-max). Share of FLOP "
          f"limit: useful forward-equivalent FLOPs per step (padding excluded) / step time / "
          f"measured GEMM peak ({info[f'gemm_peak_gflops_{gemm}']} GFLOP/s, {gemm}); "
          f"recomputation under gradient checkpointing is not useful work.\n\n")
    md += table(["trainer", "weights / autocast / checkpointing", "s/step", "vs TRL live",
                 "forward-equivalents per row",
                 "of FLOP limit", "peak RSS GiB", "RSS vs TRL live (GiB)",
                 "TRL reference precompute s"], rows)
    result = {"command": command_line(), "machine": info, "shape": shape, "data": stats,
              "steps": steps, "reference_weights_gib": ref_gib,
              "args": vars(args) | {"out": str(args.out)}, "runs": runs, "summary": summary}
    write(args.out, "train_step", result, md)


if __name__ == "__main__":
    main()
