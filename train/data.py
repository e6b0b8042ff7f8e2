"""The cache as training data: verified and fingerprint-checked before the first step,
spilled once into a memory-mapped Arrow file (random access without holding rows as
Python objects), ordered per epoch by the seed, sliced per process, padded (or packed)
per batch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from shared.cache import MANIFEST, verify_cache
from shared.dataset import map_shards
from shared.errors import CacheError, writing
from shared.fingerprint import tokenizer_fingerprint
from shared.vision import VISION_COLUMNS
from train.packing import packed, padded

log = logging.getLogger(__name__)
COLUMNS = ("id", "label", "prompt_ids", "completion_ids", "kl_completion_ids", "ref_logps",
           "ref_kl_logps")
_MEGABATCH = 50  # length grouping sorts within windows of 50 global batches (as HF does)


@dataclass
class CacheRows:
    table: pa.Table
    manifest: dict[str, Any]
    lengths: np.ndarray  # prompt + completion tokens per row

    def __len__(self) -> int:
        return self.table.num_rows


def check_cache_folder(directory: str, model: str, option: str = "--cache") -> None:
    """Before anything loads: a data file (or a folder of data) given where a cache belongs
    is named, with the kto-precompute command that builds the cache from it."""
    p = Path(directory)
    if p.is_dir() and ((p / MANIFEST).is_file() or any(p.glob("manifest.worker-*.json"))):
        return  # a cache, or worker parts (verify_cache says to combine them)
    if not p.exists():
        raise CacheError(f"{option} {directory}: no such folder; give the --output folder of a "
                         "kto-precompute run")
    what = "a file" if p.is_file() else "a folder without manifest.json"
    raise CacheError(f"{option} {directory} is {what}, not a kto-precompute cache. If it holds "
                     f"your data, build the cache from it first: kto-precompute --model {model} "
                     f"--data {directory} --output CACHE_DIR, then pass {option} CACHE_DIR")


def open_cache(directory: str, tokenizer: Any, spill: Path,
               tokenizer_name: str = "the policy's") -> CacheRows:
    """Verify checksums and the tokenizer fingerprint, then map the rows."""
    manifest = verify_cache(directory, checksums=True)
    mine, theirs = tokenizer_fingerprint(tokenizer), manifest["tokenizer"]["fingerprint"]
    if mine != theirs:
        raise CacheError(tokenizer_mismatch(directory, manifest, mine, tokenizer_name))
    columns = COLUMNS + (VISION_COLUMNS if "processor" in manifest else ())
    with writing(spill, where="TMPDIR"):
        table = map_shards(directory, manifest, columns, spill)
    lengths = (pc.list_value_length(table["prompt_ids"]).to_numpy()
               + pc.list_value_length(table["completion_ids"]).to_numpy())
    return CacheRows(table, manifest, lengths)


def token_id_range(rows: CacheRows) -> tuple[int, int]:
    """The smallest and largest token id in the rows' sequences."""
    lows, highs = [], []
    for column in ("prompt_ids", "completion_ids", "kl_completion_ids"):
        flat = pc.list_flatten(rows.table[column])
        if len(flat):
            lows.append(pc.min(flat).as_py())
            highs.append(pc.max(flat).as_py())
    return (min(lows), max(highs)) if lows else (0, -1)


def check_token_ids(rows: CacheRows, vocab_size: int, what: str) -> None:
    """Every token id must index the policy's embedding (a smaller or resized embedding
    would fail deep inside the first forward)."""
    low, high = token_id_range(rows)
    if low < 0 or high >= vocab_size:
        raise CacheError(f"{what} holds token ids in [{low}, {high}], but the policy's "
                         f"embedding has {vocab_size} rows: the policy does not belong to the "
                         "cache's tokenizer (resized or truncated embedding?); use the policy "
                         "the cache was built for, or rebuild the cache with this policy")


def check_eval_pairing(train: dict[str, Any], evaluation: dict[str, Any]) -> None:
    """An eval cache scored under another reference model (or dtype) gives rewards against
    another baseline: its metrics would silently mean something else."""
    fields = (("reference model weights", ("reference_model", "fingerprint")),
              ("reference dtype", ("reference_model", "dtype")),
              ("tokenizer", ("tokenizer", "fingerprint")),
              ("image processor", ("processor", "fingerprint")))
    train, evaluation = _with_processor(train), _with_processor(evaluation)
    differ = [f"{name}: {train[a][b][:16]} (train) vs {evaluation[a][b][:16]} (eval)"
              for name, (a, b) in fields if train[a][b] != evaluation[a][b]]
    if differ:
        raise CacheError("--eval-cache was built differently from --cache ("
                         + "; ".join(differ) + "): its rewards would be measured against "
                         "another reference. Build both caches with the same --model and "
                         "--dtype in kto-precompute")


def _with_processor(manifest: dict[str, Any]) -> dict[str, Any]:
    """A text cache compares as having the processor "none"."""
    return {**manifest, "processor": manifest.get("processor", {"fingerprint": "none"})}


def tokenizer_mismatch(directory: str, manifest: dict[str, Any], mine: str,
                       tokenizer_name: str) -> str:
    """The cache's reference model and tokenizer, and the command that rebuilds it."""
    reference = manifest.get("reference_model", {}).get("path", "MODEL")
    theirs = manifest["tokenizer"]
    data = " ".join(f"--data {f['path']}" for f in manifest.get("data", {}).get("files", [])
                    if "path" in f) or "--data DATA"
    return (f"{directory} was tokenized with another tokenizer: the cache's is "
            f"{theirs.get('path', '?')} (reference model {reference}, fingerprint "
            f"{theirs['fingerprint'][:12]}), the policy's is {tokenizer_name} (fingerprint "
            f"{mine[:12]}). Rebuild the cache with the policy's tokenizer: kto-precompute "
            f"--model {reference} --tokenizer {tokenizer_name} {data} --output NEW_CACHE "
            f"(then --cache NEW_CACHE), or pass --tokenizer {theirs.get('path', '?')} if that "
            "is the policy's tokenizer")


def check_max_length(c_max_length: int | None, manifest: dict[str, Any], directory: str) -> None:
    """kto-train --max-length (TRL's max_length, so one YAML serves both commands): the
    lengths were fixed when the cache was built; a different value is an error."""
    built = manifest.get("preprocessing", {}).get("max_length")
    if c_max_length is not None and c_max_length != built:
        raise CacheError(f"--max-length {c_max_length}: {directory} was built with --max-length "
                         f"{built}, and lengths are fixed when the cache is built; rebuild it "
                         f"with kto-precompute --max-length {c_max_length}, or drop "
                         "--max-length here")


def epoch_order(lengths: np.ndarray, epoch: int, seed: int, global_batch: int,
                group_by_length: bool) -> np.ndarray:
    """Row indices for one epoch: a seeded shuffle, then (optionally) sorted by length
    inside windows of 50 global batches, with those batches shuffled again so that
    long and short batches interleave. The last partial global batch is dropped."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    usable = len(order) - len(order) % global_batch
    if group_by_length:
        window = global_batch * _MEGABATCH
        chunks = [order[s:s + window] for s in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
        batches = order[:usable].reshape(-1, global_batch)
        return batches[rng.permutation(len(batches))].reshape(-1)
    return order[:usable]


def micro_batch_rows(order: np.ndarray, step_in_epoch: int, micro: int, process: int,
                     per_device: int, accumulation: int, world: int) -> np.ndarray:
    """The rows of one process for one accumulation micro-step of one optimizer step."""
    global_batch = per_device * accumulation * world
    start = step_in_epoch * global_batch + (micro * world + process) * per_device
    return order[start:start + per_device]


def collate(rows: CacheRows, indices: np.ndarray, pad_id: int, pack: bool = False,
            images: Callable[[dict[str, list[Any]]], dict[str, torch.Tensor]] | None = None
            ) -> dict[str, Any]:
    """One micro-batch: its labels and reference values, and the target and KL
    sequences in the layout the forward takes (``train.packing``). ``images``: a
    vision-language cache's image processing (``train.vision``); target and KL
    sequences of a row share its prompt, so both get the same tensors."""
    batch = rows.table.take(pa.array(indices)).to_pydict()
    pixels = images(batch) if images is not None else {}

    def layout(completions: list[list[int]]) -> dict[str, Any]:
        seqs = (packed(batch["prompt_ids"], completions) if pack
                else padded(batch["prompt_ids"], completions, pad_id))
        return {**seqs, **pixels}

    return {
        "ids": batch["id"],
        "labels": torch.tensor(batch["label"], dtype=torch.bool),
        "ref_logps": torch.tensor(batch["ref_logps"], dtype=torch.float64),
        "ref_kl_logps": torch.tensor(batch["ref_kl_logps"], dtype=torch.float64),
        "completion_lengths": torch.tensor([len(c) for c in batch["completion_ids"]]),
        "target": layout(batch["completion_ids"]),
        "kl": layout(batch["kl_completion_ids"]),
    }
