"""TRL's KTOTrainer on exactly the sequences of a kto-precompute cache (one process,
run by the benchmarks; needs the `bench` extra).

The rows' token ids (prompt, completion and the cache's KL completion) become TRL's
already-tokenized dataset, so TRL scores and trains on the same sequences as
kto-precompute / kto-train; TRL's own tokenization is skipped (and not timed). Prints
one JSON line: what was timed and how long it took.

    python benchmarks/trl_kto.py --model M --cache C --mode precompute-only|live|precompute
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def cache_dataset(cache: Path):
    """Our cache's rows in TRL's post-tokenization column names, in cache order."""
    from datasets import Dataset

    from shared.dataset import open_cache

    cols = ["prompt_ids", "completion_ids", "kl_completion_ids", "label"]
    data = open_cache(cache, columns=cols).table.to_pydict()
    data["KL_completion_ids"] = data.pop("kl_completion_ids")
    return Dataset.from_dict(data)


def pretokenized_trainer():
    """KTOTrainer that takes already-tokenized rows as they are (TRL's own
    post-tokenization columns) and times its reference precompute."""
    from trl import KTOTrainer

    class PreTokenized(KTOTrainer):
        precompute_seconds = 0.0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.monotonic()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            PreTokenized.precompute_seconds += time.monotonic() - t0
            return out

    return PreTokenized


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--mode", choices=("precompute-only", "live", "precompute"), required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precompute-batch-size", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--torch-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="dtype the model's weights are loaded in")
    ap.add_argument("--bf16", action="store_true", help="KTOConfig(bf16=True): bf16 autocast")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                    default=False)
    ap.add_argument("--trl-defaults", action="store_true",
                    help="leave bf16 and gradient_checkpointing to KTOConfig's defaults (TRL "
                         "1.16: both on) instead of --bf16/--gradient-checkpointing")
    ap.add_argument("--dump", type=Path, default=None,
                    help="write TRL's reference log-probs (JSON) here after the precompute")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig

    PreTokenized = pretokenized_trainer()
    torch.manual_seed(0)
    dataset = cache_dataset(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.torch_dtype))
    work = tempfile.mkdtemp(prefix="trl-kto-")
    precision = {} if args.trl_defaults else {"bf16": args.bf16,
                                              "gradient_checkpointing": args.gradient_checkpointing}
    config = KTOConfig(
        output_dir=work, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        beta=args.beta, learning_rate=args.learning_rate, max_length=args.max_length,
        precompute_ref_log_probs=args.mode != "live",
        precompute_ref_batch_size=args.precompute_batch_size,
        train_sampling_strategy="sequential", **precision, logging_steps=10**9,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True)
    t0 = time.monotonic()
    trainer = PreTokenized(model=model, args=config, train_dataset=dataset,
                           processing_class=tokenizer)
    init_seconds = time.monotonic() - t0
    result = {"mode": args.mode, "rows": len(dataset), "init_seconds": round(init_seconds, 3),
              "precompute_seconds": round(PreTokenized.precompute_seconds, 3),
              "keeps_reference_model": trainer.ref_model is not None,
              "settings": {"weights_dtype": args.torch_dtype, "bf16_autocast": config.bf16,
                           "gradient_checkpointing": config.gradient_checkpointing}}
    if args.dump and args.mode != "live":
        ds = trainer.train_dataset
        args.dump.write_text(json.dumps({"ref_logps": list(ds["ref_logps"]),
                                         "ref_kl_logps": list(ds["ref_KL_logps"])}))
    if args.mode != "precompute-only":
        t0 = time.monotonic()
        out = trainer.train()
        seconds = time.monotonic() - t0
        result |= {"steps": out.global_step, "train_seconds": round(seconds, 3),
                   "seconds_per_step": round(seconds / out.global_step, 4),
                   "train_loss": out.training_loss}
    if torch.cuda.is_available():
        result["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
