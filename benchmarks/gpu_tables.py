"""The GPU tables, one command each, sized for about 8 minutes on one H200-class GPU
with the 0.5B Qwen2 shape and both real demo files (900 rows, <= 1024 tokens); DATA is
the data/ folder of LLaMA-Factory (kto_en_demo.json, dpo_en_demo.json):

    python benchmarks/gpu_tables.py masks                  --out runs/gpu/masks      # SDPA NaN
    python benchmarks/gpu_tables.py scoring   --data DATA  --out runs/gpu/scoring    # vLLM, hf, TRL
    python benchmarks/gpu_tables.py train     --data DATA  --out runs/gpu/train      # vs TRL
    python benchmarks/gpu_tables.py agreement --data DATA  --out runs/gpu/agreement  # vs float64

Every tool runs in its own process, as a user would run it. Recorded for each run: its
dtype and gradient-checkpointing settings, the torch allocator's peak (the tools' own
`torch.cuda.max_memory_allocated`), the device memory in use (nvidia-smi: vLLM's engine
process too) and the host RSS of the process tree. The FLOP limit is a bf16 GEMM on the
GPU of the run. `--tiny` runs everything on a 2-layer Qwen2 and a data slice: a dry run
that fits a CPU (its numbers mean nothing)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402,I001
    add_data_arg, command_line, data_files, data_slice, measure, table, tokenizer_corpus,
    versions)
from gpu import DeviceMemory, build_qwen2, device_gemm_peak, flops_per_token, on_gpu  # noqa: E402

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 128, "vocab_size": 8192}
# The CPU redo of the training table: Qwen2-0.5B's 151936-entry vocabulary (whose logits
# are what the chunked head saves) on a body a 2-core machine can train in minutes
CPU_151K = {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
            "num_key_value_heads": 2, "intermediate_size": 2048, "vocab_size": 151936}
SHAPES = {"qwen2-0.5b": None, "cpu-151k": CPU_151K, "tiny": TINY}
BENCH = Path(__file__).resolve().parent


def setup(args, peak: bool = True) -> tuple[Path, list[str], dict]:
    """Model, data and machine facts (``peak=False``: without the GEMM peak)."""
    name = "tiny" if args.tiny else args.shape
    files = data_files(args.data)
    model = build_qwen2(args.out.parent / f"model-qwen2-{name}", tokenizer_corpus(files),
                        SHAPES[name])
    records = 12 if args.tiny and not args.records else args.records
    data = (data_slice(args.out / "data", records, files) if records else
            [str(f) for f in files])
    info = {"gpu": _gpu_name(), "versions": versions(), "model": name,
            **flops_per_token(model),
            "gemm_peak_tflops_bfloat16": (round(device_gemm_peak("bfloat16") / 1e12, 2)
                                          if peak else None)}
    return model, data, info


def _gpu_name() -> str | None:

    # NVML, not torch.cuda: this process may still start a vLLM engine
    names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    lines = names.stdout.strip().splitlines() if names and names.returncode == 0 else []
    return lines[0] if lines else None


class RunFailed(Exception):
    """One tool's run exited non-zero; the table records it and goes on."""


def run(cmd: list[str], what: str) -> tuple[dict, float, float, float | None]:
    """(last JSON object printed, wall seconds, peak host RSS GiB, device GiB)."""
    with DeviceMemory() as mem:
        m = measure(cmd)
    if m.returncode != 0:
        tail = " | ".join(m.stderr.strip().splitlines()[-3:])
        raise RunFailed(f"{what}: exit {m.returncode}: {tail[-400:]}")
    out = m.stdout
    summary = json.loads(out[out.rindex("\n{") + 1:] if "\n{" in out else out[out.index("{"):])
    return summary, round(m.seconds, 1), round(m.peak_rss_gib, 2), mem.gib


def precompute(model: Path, data: list[str], out: Path, backend: str, dtype: str,
               max_length: int) -> dict:
    cmd = [sys.executable, "-m", "precompute.cli", "--model", str(model), "--output", str(out),
           "--backend", backend, "--dtype", dtype, "--max-length", str(max_length),
           "--max-prompt-length", str(max_length // 2),
           "--overwrite", *[a for d in data for a in ("--data", d)]]
    s, wall, rss, dev = run(cmd, f"kto-precompute --backend {backend}")
    return {"tokens": s["tokens_scored_now"], "seconds": s["scoring_seconds"], "wall": wall,
            "rss_gib": rss, "device_gib": dev, "torch_peak_gib": s.get("peak_gpu_memory_gib"),
            "dtype": dtype}


def trl_precompute(model: Path, cache: Path, tokens: int, batch: int, dtype: str) -> dict:
    cmd = [sys.executable, str(BENCH / "trl_kto.py"), "--model", str(model), "--cache",
           str(cache), "--mode", "precompute-only", "--batch-size", str(batch),
           "--precompute-batch-size", str(batch)]
    # scored in the dtype of kto-precompute's run: weights loaded in it, autocast to it
    cmd += ["--torch-dtype", dtype] + (["--bf16"] if dtype == "bfloat16" else [])
    s, wall, rss, dev = run(cmd, "TRL precompute")
    return {"tokens": tokens, "seconds": s["precompute_seconds"], "wall": wall, "rss_gib": rss,
            "device_gib": dev, "torch_peak_gib": s.get("cuda_peak_gib"),
            "dtype": s["settings"]["weights_dtype"]}


def attempt(args, label: str, fn, *fn_args) -> dict:
    """One measurement. A failure becomes a row instead of ending the table, and every
    result is appended to OUT/runs.jsonl at once: a run cut short keeps what finished."""
    try:
        result = fn(*fn_args)
    except RunFailed as err:
        result = {"error": str(err)}
    args.out.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"run": label, **result})
    with open(args.out / "runs.jsonl", "a") as f:
        f.write(line + "\n")
    print(line, flush=True)
    return result


def scoring(args) -> None:
    model, data, info = setup(args)
    limit = info["gemm_peak_tflops_bfloat16"] * 1e12 / info["flops_per_token"]
    runs = {b: attempt(args, b, precompute, model, data, args.out / f"cache-{b}", b, args.dtype,
                       args.max_length) for b in ("hf", "vllm")}
    runs["trl"] = (attempt(args, "trl", trl_precompute, model, args.out / "cache-hf",
                           runs["hf"]["tokens"], args.trl_batch_size, args.dtype)
                   if "error" not in runs["hf"] else {"error": "no hf cache to score"})
    names = {"vllm": "kto-precompute, vLLM", "hf": "kto-precompute, transformers (auto batch)",
             "trl": f"TRL 1.16 precompute (batch {args.trl_batch_size})"}
    trl = runs["trl"]
    trl_rate = trl["tokens"] / trl["seconds"] if "error" not in trl else None
    rows = []
    for b, r in runs.items():
        if "error" in r:
            rows.append([names[b], args.dtype, "failed", "", "", "", "", "", r["error"][:80]])
            continue
        rate = r["tokens"] / r["seconds"]
        rows.append([names[b], r["dtype"], f"{rate:,.0f}",
                     f"{rate / trl_rate:.2f}x" if trl_rate else "",
                     f"{100 * rate / limit:.0f}%", r["wall"], _gib(r["torch_peak_gib"]),
                     _gib(r["device_gib"]), r["rss_gib"]])
    tokens = next((r["tokens"] for r in runs.values() if "tokens" in r), 0)
    md = (f"`{command_line()}`: {info['model']} ({info['total'] / 1e6:.0f}M parameters), "
          f"{tokens:,} tokens scored per run, GPU {info['gpu']}, FLOP limit "
          f"{info['gemm_peak_tflops_bfloat16']} TFLOP/s (bf16 GEMM here) / "
          f"{info['flops_per_token'] / 1e9:.2f} GFLOP per token = {limit:,.0f} tokens/s.\n\n")
    md += table(["scorer", "dtype", "tokens/s", "vs TRL", "of FLOP limit", "wall s",
                 "torch peak GiB", "device GiB (nvidia-smi)", "host RSS GiB"], rows)
    write(args, "scoring", {"info": info, "runs": runs}, md)


def _gib(value) -> str:
    return "" if value is None else f"{value:.2f}"


def write(args, name: str, result: dict, md: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(), "args": {k: str(v) for k, v in vars(args).items()},
              **result}
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{name}.md").write_text(md)
    print(md)


# (label, torch dtype of the weights, gradient checkpointing); bf16 autocast in all, as
# TRL's KTOConfig defaults to it
SETTINGS = (("TRL's defaults (checkpointing on, fp32 weights)", "float32", True),
            ("identical, no checkpointing", "float32", False),
            ("bf16 weights, checkpointing on", "bfloat16", True))
TRAINERS = ("kto-train", "trl-live", "trl-precompute")


def train_cache(model: Path, data: list[str], args) -> Path:
    cache = args.out / "cache"
    if not (cache / "manifest.json").is_file():
        precompute(model, data, cache, "hf", "bfloat16", args.max_length)
    return cache


def kto_train_run(model: Path, cache: Path, out: Path, dtype: str, gc: bool, args,
                  extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "train.cli", "--model", str(model), "--cache", str(cache),
           "--output", str(out), "--max-steps", str(args.steps), "--per-device-train-batch-size",
           str(args.batch_size), "--learning-rate", str(args.learning_rate), "--logging-steps",
           str(args.steps), "--seed", "0", "--bf16", "--torch-dtype", dtype,
           "--gradient-checkpointing" if gc else "--no-gradient-checkpointing", *extra]
    s, wall, rss, dev = run(cmd, "kto-train")
    return {"s_per_step": s["train_seconds"] / s["steps_run"], "torch_peak_gib":
            s.get("peak_memory_gib"), "device_gib": dev, "rss_gib": rss, "wall": wall}


def trl_run(model: Path, cache: Path, mode: str, dtype: str, gc: bool, args) -> dict:
    cmd = [sys.executable, str(BENCH / "trl_kto.py"), "--model", str(model), "--cache",
           str(cache), "--mode", mode, "--batch-size", str(args.batch_size), "--max-steps",
           str(args.steps), "--learning-rate", str(args.learning_rate), "--bf16",
           "--torch-dtype", dtype, "--gradient-checkpointing" if gc else
           "--no-gradient-checkpointing"]
    s, wall, rss, dev = run(cmd, f"TRL {mode}")
    return {"s_per_step": s["seconds_per_step"], "torch_peak_gib": s.get("cuda_peak_gib"),
            "device_gib": dev, "rss_gib": rss, "wall": wall,
            "precompute_seconds": s["precompute_seconds"]}


def train(args) -> None:
    model, data, info = setup(args)
    cache = train_cache(model, data, args)
    runs = []
    for label, dtype, gc in SETTINGS:
        for trainer in TRAINERS:
            name = f"{trainer}-{dtype}-{'gc' if gc else 'nogc'}"
            r = (attempt(args, name, kto_train_run, model, cache, args.out / name, dtype, gc,
                         args) if trainer == "kto-train" else
                 attempt(args, name, trl_run, model, cache, trainer.removeprefix("trl-"),
                         dtype, gc, args))
            runs.append({"setting": label, "trainer": trainer, "torch_dtype": dtype,
                         "gradient_checkpointing": gc, "bf16_autocast": True, **r})
    if args.packed:  # padding-free with flex attention, TRL's defaults otherwise
        r = attempt(args, "kto-train-packed", kto_train_run, model, cache,
                    args.out / "kto-train-packed", "float32", True, args,
                    ("--attn-implementation", "flex_attention", "--padding-free"))
        runs.append({"setting": SETTINGS[0][0], "trainer": "kto-train, packed (flex)",
                     "torch_dtype": "float32", "gradient_checkpointing": True,
                     "bf16_autocast": True, **r})
    write(args, "train", {"info": info, "runs": runs}, train_table(runs, info, args))


def train_table(runs: list[dict], info: dict, args) -> str:
    live = {r["setting"]: r for r in runs if r["trainer"] == "trl-live" and "error" not in r}
    rows = []
    for r in runs:
        ref = live.get(r["setting"])
        if "error" in r:
            rows.append([r["setting"], r["trainer"], r["torch_dtype"],
                         "on" if r["gradient_checkpointing"] else "off", "failed", "", "", "",
                         r["error"][:80]])
            continue
        rows.append([r["setting"], r["trainer"], r["torch_dtype"],
                     "on" if r["gradient_checkpointing"] else "off", f"{r['s_per_step']:.3f}",
                     f"{r['s_per_step'] / ref['s_per_step']:.2f}x" if ref else "",
                     _gib(r["torch_peak_gib"]), _gib(r["device_gib"]), r["rss_gib"]])
    data = f"first {args.records} records of" if args.records else "all 900 rows of"
    md = (f"`{command_line()}`: {info['model']} ({info['total'] / 1e6:.0f}M parameters), GPU "
          f"{info['gpu']}, batch {args.batch_size}, {args.steps} steps, learning rate "
          f"{args.learning_rate}, bf16 autocast in every run, {data} both real demo files "
          f"(<= {args.max_length} tokens). TRL's reference weights: "
          f"{info['total'] * 4 / 2**30:.2f} GiB in float32.\n\n")
    return md + table(["setting", "trainer", "weights", "checkpointing", "s/step",
                       "vs TRL live", "torch peak GiB", "device GiB (nvidia-smi)",
                       "host RSS GiB"], rows)


def agreement(args) -> None:
    """Per sequence and per token, on a sample of rows: vLLM and hf, float32 and bf16,
    against the naive oracle (one sequence at a time, float64 log-softmax). vLLM runs in
    its own process (benchmarks/vllm_tokens.py, as backends.py does)."""
    import numpy as np
    from backends import naive_tokens, vllm_tokens

    model, data, info = setup(args)
    cache = args.out / "cache-hf-float32"
    precompute(model, data, cache, "hf", "float32", args.max_length)
    pairs = sample_pairs(cache, args.sample)
    tokens = {f"vllm {d}": vllm_tokens(model, pairs, args.out, d) for d in ("float32", "bfloat16")}
    tokens |= {f"hf {d}": hf_tokens(model, d, pairs) for d in ("float32", "bfloat16")}
    naive = naive_tokens(model, pairs)
    rows, result = [], {}
    for name, values in tokens.items():
        seq = np.array([abs(v.sum() - n.sum()) for v, n in zip(values, naive, strict=True)])
        tok = np.concatenate([np.abs(v - n) for v, n in zip(values, naive, strict=True)])
        result[name] = {"sequence_max": float(seq.max()), "sequence_mean": float(seq.mean()),
                        "token_max": float(tok.max()), "token_mean": float(tok.mean())}
        rows.append([name, f"{seq.max():.2e}", f"{seq.mean():.2e}", f"{tok.max():.2e}",
                     f"{tok.mean():.2e}"])
    n_tok = sum(len(n) for n in naive)
    md = (f"`{command_line()}`: {info['model']}, GPU {info['gpu']}, {len(pairs)} rows of both "
          f"real demo files ({n_tok} completion tokens), |value - naive float64 oracle| in "
          "nats.\n\n")
    md += table(["scorer", "per sequence max", "per sequence mean", "per token max",
                 "per token mean"], rows)
    write(args, "agreement", {"info": info, "results": result}, md)


def sample_pairs(cache: Path, n: int) -> list[tuple[list[int], list[int]]]:
    import numpy as np

    from shared.dataset import open_cache

    rows = open_cache(cache, columns=["prompt_ids", "completion_ids"]).table.to_pylist()
    idx = np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)
    return [(rows[i]["prompt_ids"], rows[i]["completion_ids"]) for i in idx]


def hf_tokens(model: Path, dtype: str, pairs) -> list:
    """The hf scorer's own batched path (left padding, chunked head), per token."""
    import torch

    from precompute.scoring.hf import HFScorer, completion_token_logps, left_pad

    scorer = HFScorer(str(model), dtype, batch_tokens=None)
    with torch.inference_mode():
        ids, mask, pos, clen = (t.to(scorer.device) for t in left_pad(pairs, scorer.pad_id))
        hidden = scorer.body(input_ids=ids, attention_mask=mask,
                             position_ids=pos).last_hidden_state
        lp, rows = completion_token_logps(hidden, scorer.head, ids, clen, scorer.head_rows)
    lp, rows = lp.double().cpu().numpy(), rows.cpu().numpy()
    scorer.close()
    return [lp[rows == r] for r in range(len(pairs))]


def masks(args) -> None:
    """Whether the device's own attention kernels turn fully masked query rows into NaN
    (a cause of a non-finite bf16 loss): SDPA forward and backward, bf16, the 0.5B shape's
    heads, on a causal mask with each row's padding on the left (fully masked query rows)
    or on the right (kto-train's layout). NaN anywhere, in the output of real
    rows or in a gradient, would poison a training step."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = "cuda" if on_gpu() else "cpu"
    kernels = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
               "cudnn": SDPBackend.CUDNN_ATTENTION}
    rows, result = [], []
    for name, kernel in kernels.items():
        for side in ("left", "right"):
            for pad in (1, 63, 64, 200, 700):
                r = _mask_case(torch, F, sdpa_kernel, kernel, device, side, pad)
                result.append({"kernel": name, "padding": side, "pad_tokens": pad, **r})
                rows.append([name, side, pad, r.get("error") or r["nan_real_rows"],
                             r.get("error") or r["nan_grad"]])
    md = (f"`{command_line()}`: SDPA in bfloat16 on {device}, batch 8, 14 heads of 64, 1024 "
          "positions, causal + padding mask; NaN in real rows' output / in q, k, v "
          "gradients.\n\n")
    md += table(["kernel", "padding", "pad tokens", "NaN in real rows", "NaN in gradients"],
                rows)
    write(args, "masks", {"results": result}, md)


def _mask_case(torch, F, sdpa_kernel, kernel, device, side, pad) -> dict:
    torch.manual_seed(0)
    b, h, t, d = 8, 14, 1024, 64
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    real = torch.ones(b, t, dtype=torch.bool, device=device)
    real[1::2] = False  # every other row padded
    positions = torch.arange(t, device=device)
    keep = positions >= pad if side == "left" else positions < t - pad
    real[1::2] = keep
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool, device=device))[None] & real[:, None]
    try:
        with sdpa_kernel(kernel):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
            (out * real[:, None, :, None]).float().sum().backward()
    except RuntimeError as err:  # a kernel that does not take this mask or dtype here
        return {"error": str(err).splitlines()[0][:60]}
    nan_rows = torch.isnan(out).any(-1).any(1) & real
    return {"nan_real_rows": int(nan_rows.sum()),
            "nan_grad": any(bool(torch.isnan(x.grad).any()) for x in (q, k, v))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("table", choices=("scoring", "train", "agreement", "masks"))
    ap.add_argument("--out", type=Path, required=True)
    add_data_arg(ap, required=False)  # every table but masks
    ap.add_argument("--shape", choices=tuple(SHAPES), default="qwen2-0.5b",
                    help="random Qwen2: the 0.5B shape (GPU), 4x512 with the 151936 "
                         "vocabulary (CPU table), or tiny")
    ap.add_argument("--tiny", action="store_true", help="--shape tiny, 12 records (dry run)")
    ap.add_argument("--records", type=int, default=0,
                    help="first N records of each demo file (0 = all: 900 rows)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="scoring dtype")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--trl-batch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="training batch")
    ap.add_argument("--steps", type=int, default=30, help="training steps per run")
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--packed", action="store_true",
                    help="also kto-train padding-free with flex attention")
    ap.add_argument("--sample", type=int, default=48, help="agreement: rows compared")
    args = ap.parse_args()
    {"scoring": scoring, "train": train, "agreement": agreement, "masks": masks}[args.table](args)


if __name__ == "__main__":
    main()
