"""A human-readable summary of a cache manifest."""

from __future__ import annotations

from typing import Any


def describe_cache(m: dict[str, Any]) -> str:
    c, p = m["counts"], m["preprocessing"]
    lines = [
        f"reference model : {m['reference_model']['path']} ({m['reference_model']['dtype']}, "
        f"fingerprint {m['reference_model']['fingerprint'][:12]})",
        f"tokenizer       : fingerprint {m['tokenizer']['fingerprint'][:12]}",
        f"backend         : {m['backend']['name']} "
        + " ".join(f"{k}={v}" for k, v in m["backend"]["versions"].items()),
        "data            : " + ", ".join(f"{f['path']} ({f['records']} records, {f['format']})"
                                         for f in m["data"]["files"]),
        f"options         : max_length={p['max_length']} max_prompt_length="
        f"{p['max_prompt_length']} truncation_mode={p['truncation_mode']} seed={p['seed']}",
        f"rows            : {c['rows']} ({c['desirable']} desirable, {c['undesirable']} "
        f"undesirable) from {c['records']} records",
        f"invalid records : {c['invalid']}"
        + "".join(f"\n  {reason}: {n}" for reason, n in c["invalid_by_reason"].items()),
        f"shards          : {m['num_shards']}, {m['tokens']} tokens scored",
    ]
    if "processor" in m:  # a vision-language model's cache
        settings, images = m["processor"]["settings"], m.get("images", {})
        lines[2:2] = [f"processor       : fingerprint {m['processor']['fingerprint'][:12]} "
                      f"({settings.get('image_processor_class')}, image token "
                      f"{m['processor']['image_token']!r})",
                      f"images          : {images.get('count')} in rows, "
                      f"{images.get('distinct')} distinct ({images.get('distinct_bytes')} bytes)"]
    return "\n".join(lines)
