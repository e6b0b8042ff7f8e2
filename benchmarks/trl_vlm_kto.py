"""TRL's KTOTrainer on a vision-language model with a live reference model (one process,
run by the benchmarks; needs the `bench` extra). TRL 1.16 refuses
precompute_ref_log_probs for vision data, so the reference runs on every step.

Reads TRL vision rows (JSONL: ``prompt``/``completion`` text, ``label``, ``images`` as
paths; benchmarks/vlm_rows.py writes them) and trains for --max-steps steps. Prints one
JSON line: step time (training-loop seconds / steps, setup excluded), peak RSS, the
settings the run resolved.

--collator trl: TRL's own DataCollatorForVisionUnpairedPreference tokenizes the text and
processes the images per batch (KL completions: TRL's in-batch rotation).
--collator ids: the rows' ``prompt_ids``/``completion_ids``/``kl_completion_ids`` (our
token ids, KL partners included) as TRL's batch, images through the processor's image
processor per batch, like kto-train's collator. --check-ids: before training, check
that TRL's collator gives every row exactly its ``prompt_ids`` + ``completion_ids``
(and with --collator ids, that both collators give the same batches but for KL).

    python benchmarks/trl_vlm_kto.py --model M --rows R.jsonl --settings identical
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SETTINGS = ("identical", "trl-defaults")


def load_rows(path: Path):
    """The JSONL as a datasets.Dataset; image paths (absolute, or relative to the file's
    folder) decode to PIL images when a row is read."""
    from datasets import Dataset, Image, Sequence

    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"Error: --rows {path} line {n}: not JSON ({err.msg}); "
                             "write the rows with benchmarks/vlm_rows.py") from None
        missing = [k for k in ("prompt", "completion", "label", "images") if k not in row]
        if missing:
            raise SystemExit(f"Error: --rows {path} line {n}: no {', '.join(missing)}; "
                             "write the rows with benchmarks/vlm_rows.py")
        row["images"] = [str(path.parent / p) for p in row["images"]]  # absolute stays
        absent = [p for p in row["images"] if not Path(p).is_file()]
        if absent:
            raise SystemExit(f"Error: --rows {path} line {n}: images: no such file "
                             f"{absent[0]}; fix the path (absolute, or relative to the file)")
        rows.append(row)
    if len(rows) < 2:
        raise SystemExit(f"Error: --rows {path}: {len(rows)} row(s); KTO needs at least 2")
    return Dataset.from_list(rows).cast_column("images", Sequence(Image()))


@dataclass
class IdsCollator:
    """Given token ids as TRL's vision batch: input_ids/attention_mask/completion_mask
    right-padded (what TRL's flush_left leaves), the KL triple, pixel_values from the
    image processor (every image of the batch, in row order) and label."""

    image_processor: Any
    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        out = {}
        for prefix, key in (("", "completion_ids"), ("KL_", "kl_completion_ids")):
            seqs = [e["prompt_ids"] + e[key] for e in examples]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.int64)
            mask = torch.zeros((len(seqs), width), dtype=torch.int64)
            comp = torch.zeros((len(seqs), width), dtype=torch.int64)
            for i, (e, s) in enumerate(zip(examples, seqs, strict=True)):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
                comp[i, len(e["prompt_ids"]):len(s)] = 1
            out |= {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask,
                    f"{prefix}completion_mask": comp}
        images = [img.convert("RGB") for e in examples for img in e["images"]]
        if images:
            out |= self.image_processor(images=images, return_tensors="pt")
        out["label"] = torch.tensor([e["label"] for e in examples])
        return out


def check_ids(dataset, processor) -> dict:
    """Rows whose TRL-collated sequence (alone in a batch, so no padding) differs from
    their prompt_ids + completion_ids, and the ones whose completion mask does."""
    from trl.trainer.kto_trainer import DataCollatorForVisionUnpairedPreference

    collate = DataCollatorForVisionUnpairedPreference(processor=processor, calculate_kl=False)
    ids_differ, mask_differ = [], []
    for i in range(len(dataset)):
        row = dataset[i]
        batch = collate([{k: row[k] for k in ("prompt", "completion", "label", "images")}])
        want = row["prompt_ids"] + row["completion_ids"]
        if batch["input_ids"][0].tolist() != want:
            ids_differ.append(i)
        comp = [0] * len(row["prompt_ids"]) + [1] * len(row["completion_ids"])
        if batch["completion_mask"][0].tolist() != comp:
            mask_differ.append(i)
    return {"rows": len(dataset), "ids_differ": ids_differ, "completion_mask_differs": mask_differ}


def check_batches(dataset, processor, batch_size: int) -> dict:
    """Batches (in training order) where IdsCollator and TRL's collator disagree on a
    tensor other than the KL ones (KL pairing differs by design)."""
    import torch
    from trl.trainer.kto_trainer import DataCollatorForVisionUnpairedPreference

    trl_collate = DataCollatorForVisionUnpairedPreference(processor=processor, calculate_kl=False)
    ids_collate = IdsCollator(processor.image_processor, processor.tokenizer.pad_token_id)
    differ: dict[int, list[str]] = {}
    keys = ("input_ids", "attention_mask", "completion_mask", "pixel_values", "label")
    for b in range(len(dataset) // batch_size):
        rows = [dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)]
        ours = ids_collate(rows)
        theirs = trl_collate([{k: r[k] for k in ("prompt", "completion", "label", "images")}
                              for r in rows])
        bad = [k for k in keys if k not in ours or not torch.equal(ours[k], theirs[k])]
        bad += sorted(k for k in set(theirs) - set(ours))
        if bad:
            differ[b] = bad
    return {"batches": len(dataset) // batch_size, "differ": differ}


def step_clock():
    """A TrainerCallback that keeps the wall time at the start of training and at the end
    of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        times: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.times = [time.monotonic()]

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.monotonic())

    return StepClock()


def config_kwargs(args) -> dict:
    """identical: float32, no bf16 autocast, no gradient checkpointing, --max-length (None:
    no truncation); trl-defaults: those three left to KTOConfig (TRL 1.16: bf16 autocast
    and gradient checkpointing on, max_length 1024). Batch, lr, beta: the flags in both."""
    if args.settings == "identical":
        return {"bf16": False, "gradient_checkpointing": False, "max_length": args.max_length}
    return {}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True,
                    help="a vision-language model folder with its processor")
    ap.add_argument("--rows", type=Path, required=True, help="TRL vision rows (JSONL)")
    ap.add_argument("--settings", choices=SETTINGS, default="identical")
    ap.add_argument("--collator", choices=("trl", "ids"), default="trl")
    ap.add_argument("--check-ids", action="store_true")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--max-length", type=int, default=None,
                    help="KTOConfig.max_length with --settings identical (default: none)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    dataset = load_rows(args.rows)
    processor = AutoProcessor.from_pretrained(args.model)
    result: dict[str, Any] = {"collator": args.collator, "rows": len(dataset)}
    if args.check_ids:
        result["check_ids"] = check_ids(dataset, processor)
        if args.collator == "ids":
            result["check_batches"] = check_batches(dataset, processor, args.batch_size)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    collator = None
    if args.collator == "ids":
        collator = IdsCollator(processor.image_processor, processor.tokenizer.pad_token_id)
    config = KTOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-vlm-kto-"),
        per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        beta=args.beta, learning_rate=args.learning_rate, precompute_ref_log_probs=False,
        train_sampling_strategy="sequential", logging_steps=10**9, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True, remove_unused_columns=args.collator == "trl",
        **config_kwargs(args))
    clock = step_clock()
    t0 = time.monotonic()
    trainer = KTOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=processor, data_collator=collator, callbacks=[clock])
    result |= {"init_seconds": round(time.monotonic() - t0, 3),
               "keeps_reference_model": trainer.ref_model is not None,
               "data_collator": type(trainer.data_collator).__name__,
               "peak_rss_gib_before_train": round(peak_rss_gib(), 3)}
    t0 = time.monotonic()
    out = trainer.train()
    seconds = time.monotonic() - t0
    steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    result |= {"steps": out.global_step, "train_seconds": round(seconds, 3),
               "seconds_per_step": round(seconds / out.global_step, 4),
               "step_seconds": [round(s, 4) for s in steps],
               "median_step_seconds_after_first": (round(statistics.median(steps[1:]), 4)
                                                   if len(steps) > 1 else None),
               "train_loss": out.training_loss, "peak_rss_gib": round(peak_rss_gib(), 3),
               "settings": {"name": args.settings, "weights_dtype": str(model.dtype),
                            "bf16_autocast": config.bf16,
                            "gradient_checkpointing": config.gradient_checkpointing,
                            "max_length": config.max_length, "batch_size": args.batch_size,
                            "learning_rate": config.learning_rate, "beta": config.beta,
                            "torch_threads": torch.get_num_threads()}}
    if torch.cuda.is_available():
        result["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
