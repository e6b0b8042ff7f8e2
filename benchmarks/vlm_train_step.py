"""Vision-language KTO: training step time and peak memory of kto-train (policy only, the
reference from the cache) against TRL 1.16's KTOTrainer with a live reference model (TRL
refuses ``precompute_ref_log_probs`` for vision data, so a live reference is its only way).

Same random LLaVA-style model (a CLIP tower and a Llama decoder, built here), the same
rows: LLaMA-Factory's ``mllm_demo.json`` with undesirable rows made from another
conversation's answer (``vlm_rows.py``), scored once with kto-precompute. TRL is given
exactly the cache's token ids, KL completions included, and pixel values from the same
image processor (``trl_vlm_kto.py --collator ids``). Each run is its own process; peak
memory is the resident set of the process tree, sampled.

    python benchmarks/vlm_train_step.py --data mllm_demo.json --out runs/bench/vlm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checked, command_line, fmt, measure, spread, table, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_model(out: Path, layers: int, hidden: int) -> Path:
    """The tests' tiny LLaVA builder with a larger decoder (the tower stays 32x32 images,
    16 tokens each)."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny_vision import build_llava, build_processor, build_vision_tokenizer

    if not (out / "config.json").is_file():
        tokenizer = build_vision_tokenizer()
        build_llava(tokenizer, 0, layers=layers, hidden=hidden).save_pretrained(out)
        build_processor(tokenizer).save_pretrained(out)
    return out


def build_inputs(data: Path, model: Path, out: Path) -> tuple[Path, Path]:
    """kto-precompute's cache of the rows, and the TRL rows carrying the cache's ids."""
    checked(measure([sys.executable, str(ROOT / "benchmarks" / "vlm_rows.py"), "--data",
                     str(data), "--model", str(model), "--out", str(out / "rows")]), "vlm_rows")
    cache = out / "cache"
    if not (cache / "manifest.json").is_file():
        checked(measure([sys.executable, "-m", "precompute.cli", "--model", str(model),
                         "--data", str(out / "rows" / "kto_rows.json"), "--output", str(cache),
                         "--backend", "hf", "--dtype", "float32", "--overwrite"]),
                "kto-precompute")
    return cache, with_cache_ids(cache, out / "rows" / "trl_rows.jsonl", out / "trl_rows.jsonl")


def with_cache_ids(cache: Path, rows: Path, out: Path) -> Path:
    """TRL's rows in cache order with the cache's prompt, completion and KL ids."""
    from shared.dataset import open_cache

    table = open_cache(cache, columns=["source_index", "prompt_ids", "completion_ids",
                                       "kl_completion_ids"]).table.to_pylist()
    source = [json.loads(line) for line in rows.read_text().splitlines()]
    with out.open("w") as f:
        for row in table:
            f.write(json.dumps({**source[row.pop("source_index")], **row}) + "\n")
    return out


def flags(settings: str, tool: str) -> list[str]:
    """identical: float32, no autocast, no gradient checkpointing in both. trl-defaults:
    TRL's KTOConfig defaults (bf16 autocast, gradient checkpointing) and kto-train with
    the same two on."""
    if settings == "trl-defaults":
        return ["--settings", "trl-defaults"] if tool == "trl" else [
            "--bf16", "--gradient-checkpointing"]
    return ["--settings", "identical"] if tool == "trl" else [
        "--no-bf16", "--no-gradient-checkpointing"]


def kto_train(model: Path, cache: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "train.cli", "--model", str(model), "--cache", str(cache),
           "--output", str(out), "--max-steps", str(args.steps), "--per-device-train-batch-size",
           str(args.batch_size), "--learning-rate", str(args.learning_rate), "--beta", "0.1",
           "--no-group-by-length", "--logging-steps", "1000", "--seed", "0",
           "--overwrite-output-dir", *flags(args.settings, "kto-train")]
    m = checked(measure(cmd), "kto-train")
    s = json.loads(m.stdout[m.stdout.index("{"):])
    return {"seconds_per_step": s["train_seconds"] / s["steps_run"],
            "peak_rss_gib": round(m.peak_rss_gib, 3), "wall_seconds": round(m.seconds, 2)}


def trl(model: Path, rows: Path, args) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trl_vlm_kto.py"), "--model", str(model),
           "--rows", str(rows), "--collator", "ids", "--batch-size", str(args.batch_size),
           "--max-steps", str(args.steps), "--learning-rate", str(args.learning_rate),
           "--beta", "0.1", *flags(args.settings, "trl")]
    m = checked(measure(cmd), "TRL")
    s = json.loads(m.stdout.strip().splitlines()[-1])
    return {"seconds_per_step": s["seconds_per_step"], "peak_rss_gib": round(m.peak_rss_gib, 3),
            "wall_seconds": round(m.seconds, 2), "keeps_reference_model":
            s["keeps_reference_model"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="LLaMA-Factory's mllm_demo.json")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--settings", choices=("identical", "trl-defaults"), default="identical")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    model = build_model(args.out / f"model-{args.layers}x{args.hidden}", args.layers, args.hidden)
    cache, rows = build_inputs(args.data, model, args.out)
    runs: dict[str, list[dict]] = {"kto-train (cache)": [], "TRL (live reference)": []}
    for rep in range(args.reps):
        runs["kto-train (cache)"].append(kto_train(model, cache, args.out / "policy", args))
        runs["TRL (live reference)"].append(trl(model, rows, args))
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]['seconds_per_step']:.3f} s/step "
                                         f"{v[-1]['peak_rss_gib']:.2f} GiB"
                                         for k, v in runs.items()), flush=True)
    summary = {k: {"seconds_per_step": spread([r["seconds_per_step"] for r in v], 3),
                   "peak_rss_gib": spread([r["peak_rss_gib"] for r in v], 3)}
               for k, v in runs.items()}
    live = summary["TRL (live reference)"]
    rows_md = [[k, fmt(s["seconds_per_step"], 3),
                f"{s['seconds_per_step']['median'] / live['seconds_per_step']['median']:.2f}x",
                fmt(s["peak_rss_gib"], 2),
                f"{s['peak_rss_gib']['median'] - live['peak_rss_gib']['median']:+.2f}"]
               for k, s in summary.items()]
    md = (f"`{command_line()}`: LLaVA-style {args.layers}x{args.hidden} decoder, 12 rows of "
          f"LLaMA-Factory's mllm_demo, batch {args.batch_size}, {args.steps} steps, settings "
          f"{args.settings}, {args.reps} repetitions, median (min-max).\n\n"
          + table(["trainer", "s/step", "vs TRL", "peak RSS GiB", "vs TRL GiB"], rows_md))
    write(args.out, f"vlm_train_step-{args.settings}", {"args": vars(args), "runs": runs,
                                                         "summary": summary}, md)


if __name__ == "__main__":
    main()
