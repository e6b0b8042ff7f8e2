"""The cache folder's dataset card (README.md): a YAML header that ``datasets`` and the
Hugging Face Hub read (data files, features, split size) and prose from the manifest, so
that ``datasets.load_dataset(CACHE)`` loads exactly the shards' rows and the folder
explains itself when pushed to a dataset repository as it is.

The card is a pure function of the manifest (no timestamps, no library versions beyond
the manifest's): two runs that write the same manifest write the same card."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from shared.cache import SCHEMA, VISION_SCHEMA, vision_features
from shared.files import atomic_write_text
from shared.summary import describe_cache

log = logging.getLogger(__name__)

CARD = "README.md"
_MARK = "<!-- dataset card written by kto-cache from manifest.json -->"
# datasets' names for the Arrow types of the cache schema (datasets.Value dtypes)
_DTYPES = {pa.string(): "string", pa.int64(): "int64", pa.int32(): "int32",
           pa.bool_(): "bool", pa.float64(): "float64"}
COLUMN_MEANINGS = {
    "id": "unique, stable across reruns: `{record index}-{u,c,r}-{content hash}`",
    "source_index": "index of the input record (running across input files)",
    "label": "true = desirable",
    "prompt_ids": "prompt tokens after truncation",
    "completion_ids": "completion tokens after truncation (ends with EOS unless cut)",
    "kl_completion_ids": "the KL partner's completion, cut to fit after this prompt",
    "kl_partner": "`id` of the KL partner row (same shard)",
    "ref_logps": "reference log-prob of the completion after the prompt, summed over its tokens",
    "ref_kl_logps": "reference log-prob of the KL completion after the prompt",
    "images": "the row's images, encoded as read (PNG for decoded ones); image i is the "
              "i-th image span of `prompt_ids`",
    "image_sha256": "SHA-256 of each image's bytes",
    "image_offsets": "where each image's tokens start in `prompt_ids`",
    "image_tokens": "how many `prompt_ids` tokens each image became (the processor's "
                    "expansion: image tokens and the family's markers around them)",
}
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
          (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))


def features_yaml(vision: bool = False) -> list[dict[str, str]]:
    """The cache schema in the YAML form of ``datasets.Features`` (``list: int32`` for a
    list of int32); a vision cache's images as ``list: image``, so that
    ``datasets.load_dataset(CACHE)`` decodes them."""
    if vision:
        return vision_features()._to_yaml_list()
    out = []
    for field in SCHEMA:
        if pa.types.is_list(field.type):
            out.append({"name": field.name, "list": _DTYPES[field.type.value_type]})
        else:
            out.append({"name": field.name, "dtype": _DTYPES[field.type]})
    return out


def shard_pattern(num_shards: int) -> str:
    """This cache's shards and nothing else (not manifest*.json, not another shard count)."""
    return f"shard-*-of-{num_shards:05d}.parquet"


def card_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    rows = manifest["counts"]["rows"]
    return {
        "pretty_name": f"KTO reference cache ({_model_name(manifest)})",
        "license": "other",  # the input data's and the reference model's terms apply
        "tags": ["kto", "preference", "reference-logprobs", "kto-cache"],
        "size_categories": [next((name for limit, name in _SIZES if rows < limit), "n>100M")],
        "configs": [{"config_name": "default", "data_files": [
            {"split": "train", "path": shard_pattern(manifest["num_shards"])}]}],
        # num_examples makes load_dataset check the row count. datasets ignores a split
        # entry without num_bytes (the Arrow size, which it measures itself while loading):
        # 0 stands for "not known here".
        "dataset_info": {"config_name": "default",
                         "features": features_yaml("processor" in manifest),
                         "splits": [{"name": "train", "num_bytes": 0, "num_examples": rows}]},
    }


def _model_name(manifest: dict[str, Any]) -> str:
    return manifest["reference_model"]["path"].rstrip("/").split("/")[-1]


def card_text(manifest: dict[str, Any]) -> str:
    header = yaml.safe_dump(card_metadata(manifest), sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n{_prose(manifest)}"


_INTRO = """\
Reference log-probabilities for KTO training, written by `kto-precompute` (kto-cache). One
row per KTO example: a prompt, a completion, a label (desirable or not), the reference
model's log-probability of the completion and of a mismatched "KL" completion (another row's
completion after this prompt). `kto-train` trains a policy from it with no reference model in
memory. Token ids are those of the tokenizer below: a policy must use the same tokenizer.

This card is generated from `manifest.json`, which holds the full record (fingerprints,
options, counts, every shard's SHA-256); `kto-precompute` and `kto-precompute combine`
rewrite it."""

_USE = """## Use

```python
import datasets
ds = datasets.load_dataset("PATH_OR_REPO_ID", split="train")  # the shards; no checksum check

from shared.dataset import load_cache_dataset, open_cache  # the kto-cache package
ds = load_cache_dataset("CACHE_DIR")   # checks every shard's SHA-256 against manifest.json
table = open_cache("CACHE_DIR").table  # the same rows as a memory-mapped pyarrow.Table
```

```bash
kto-precompute verify CACHE_DIR                          # checksums, counts, summary
kto-train --model POLICY --cache CACHE_DIR --output OUT  # train a policy from it
```

## License

Derived from the input data and the reference model named above: their licenses apply.
Set `license` in the header to match them before publishing.
"""


def _prose(m: dict[str, Any]) -> str:
    schema = VISION_SCHEMA if "processor" in m else SCHEMA
    columns = "\n".join(f"| `{f.name}` | {_type_name(f.type)} | {COLUMN_MEANINGS[f.name]} |"
                        for f in schema)
    return (f"{_MARK}\n\n# KTO reference cache: {_model_name(m)}\n\n{_INTRO}\n\n"
            f"## Contents\n\n```text\n{describe_cache(m)}\n```\n\n{_contents(m)}\n\n"
            "## Columns\n\n| column | type | meaning |\n| --- | --- | --- |\n"
            f"{columns}\n\n{_USE}")


def _contents(m: dict[str, Any]) -> str:
    c, p, model = m["counts"], m["preprocessing"], m["reference_model"]
    invalid = "".join(f"\n- {reason}: {n}" for reason, n in c["invalid_by_reason"].items())
    options = ", ".join(f"`{k}={v}`" for k, v in p.items() if k != "format_version")
    return "\n".join([
        f"- reference model: `{model['path']}`, {model['dtype']}, fingerprint "
        f"`{model['fingerprint']}`",
        f"- tokenizer fingerprint: `{m['tokenizer']['fingerprint']}`",
        f"- options: {options}",
        f"- rows: {c['rows']} ({c['desirable']} desirable, {c['undesirable']} undesirable) "
        f"from {c['records']} input records; invalid records: {c['invalid']}{invalid}",
        f"- shards: {m['num_shards']} (`{shard_pattern(m['num_shards'])}`), {m['tokens']} "
        "tokens scored",
        f"- cache key: `{m['cache_key']}`"])


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t) and pa.types.is_struct(t.value_type):
        return "list<image>"
    return f"list<{t.value_type}>" if pa.types.is_list(t) else _DTYPES[t]


def is_card(path: Path) -> bool:
    """A README.md that this module wrote (and may therefore replace or remove)."""
    if path.name != CARD or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        return _MARK in f.read(64 * 1024)


def write_card(directory: str | Path, manifest: dict[str, Any]) -> Path | None:
    """Write README.md atomically (temporary name, then rename). A README.md that is not
    a card written here (say, ``--output`` is a project folder) is left alone."""
    path = Path(directory) / CARD
    if path.exists() and not is_card(path):
        log.warning("%s exists and is not a kto-cache dataset card: left as it is, no card "
                    "written (datasets.load_dataset may then not find the shards)", path)
        return None
    atomic_write_text(path, card_text(manifest))
    return path
