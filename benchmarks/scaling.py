"""Precompute scaling: wall time and peak memory of kto-precompute for growing numbers
of synthetic rows with a tiny 2x64 Llama (its tokenizer trained on the --data files, as
the other tables' random models; without --data, on the tests' corpus). Time should
grow linearly and memory stay flat: rows are streamed into an Arrow spill and scored
shard by shard, never held as Python objects all at once.

    python benchmarks/scaling.py --data DATA --out runs/bench/scaling
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    ModelShape,
    add_data_arg,
    checked,
    command_line,
    data_files,
    fmt,
    machine,
    measure,
    spread,
    table,
    tokenizer_corpus,
    write,
)

TOPICS = ("the weather", "a recipe", "train times", "a library book", "the garden", "taxes")


def synthetic(path: Path, rows: int) -> Path:
    """Unpaired JSONL rows of varied length; deterministic."""
    if path.is_file():
        return path
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            topic = TOPICS[i % len(TOPICS)]
            prompt = f"Request {i}: tell me about {topic}" + " please" * (i % 7) + "."
            good = i % 2 == 0
            completion = (f"Sure, here is what I know about {topic}: item {i * 31 % 997}."
                          if good else f"No. {topic} is boring" + "!" * (i % 5))
            f.write(json.dumps({"prompt": prompt, "completion": completion,
                                "label": good}) + "\n")
    return path


def scaling_model(args) -> tuple[Path, str]:
    if args.real_model or args.model_dir:
        from train.real_model import materialize

        model = materialize() if args.real_model else args.model_dir
        return Path(model), ModelShape.from_config(model).describe()
    model = args.out / "tiny-model"
    if not (model / "config.json").is_file():
        if args.data:
            from train import demo

            demo.save_model(model, tokenizer_corpus(data_files(args.data)))
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny import save_tiny

            save_tiny(model)
    return model, "tiny 2x64 Llama"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a saved model folder instead of the tests' tiny model")
    ap.add_argument("--real-model", action="store_true",
                    help="SmolLM2-135M-Instruct (make real-model); use smaller --sizes")
    add_data_arg(ap, required=False)  # only the tiny model's tokenizer reads it
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    model, what = scaling_model(args)
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for rep in range(args.reps):
        for n in sizes:
            data = synthetic(args.out / f"rows-{n}.jsonl", n)
            cmd = [sys.executable, "-m", "precompute.cli", "--model", str(model), "--data",
                   str(data), "--output", str(args.out / f"cache-{n}"), "--backend",
                   args.backend, "--overwrite"]
            m = checked(measure(cmd), f"kto-precompute on {n} rows")
            s = json.loads(m.stdout)
            runs[n].append({"wall_seconds": round(m.seconds, 2),
                            "total_seconds": s["total_seconds"],
                            "scoring_seconds": s["scoring_seconds"],
                            "tokens": s["tokens_scored_now"],
                            "peak_rss_gib": round(m.peak_rss_gib, 3)})
            print(f"rep {rep} {n} rows: {m.seconds:.1f} s, {m.peak_rss_gib:.2f} GiB", flush=True)

    summary, rows = {}, []
    for n in sizes:
        s = {k: spread([r[k] for r in runs[n]], 3) for k in
             ("wall_seconds", "total_seconds", "peak_rss_gib")}
        s["tokens"] = runs[n][0]["tokens"]
        summary[n] = s
        rows.append([f"{n:,}", f"{s['tokens']:,}", fmt(s["wall_seconds"], 1),
                     fmt(s["total_seconds"], 1),
                     f"{1000 * s['total_seconds']['median'] / n:.2f}",
                     fmt(s["peak_rss_gib"], 2)])
    md = (f"`{command_line()}`: {what}, `--backend {args.backend}`, default shard "
          f"size (1000 rows), {args.reps} repetitions, median (min-max). Work time is the "
          f"run's own `total_seconds` (tokenize, pair, score, write); wall adds interpreter "
          f"and model start-up.\n\n")
    md += table(["rows", "tokens scored", "wall s", "work s", "work ms per row",
                 "peak RSS GiB"], rows)
    result = {"command": command_line(), "machine": machine(),
              "args": vars(args) | {"out": str(args.out)}, "runs": runs, "summary": summary}
    write(args.out, "scaling", result, md)


if __name__ == "__main__":
    main()
