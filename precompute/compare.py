"""Compare the reference values of two caches of the same rows (e.g. bf16 vs fp32, or
vLLM vs transformers): how far apart are the sums, row by row, matched by id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared.dataset import open_cache
from shared.errors import CacheError

COLUMNS = ("ref_logps", "ref_kl_logps")


# what must be equal for two caches to hold the same sequences (and KL pairs); the
# reference side (model, dtype, backend) is what a comparison is for
SAME_ROWS = (("tokenizer", "fingerprint"), ("tokenizer", "chat_template_sha256"),
             ("data", "fingerprint"), ("preprocessing", "max_length"),
             ("preprocessing", "max_prompt_length"), ("preprocessing", "truncation_mode"),
             ("preprocessing", "seed"), ("preprocessing", "shard_size"),
             ("preprocessing", "columns"))
COMPARED = (("reference_model", "fingerprint"), ("reference_model", "dtype"),
            ("backend", "name"))


def _field(manifest: dict[str, Any], path: tuple[str, str]) -> Any:
    return (manifest.get(path[0]) or {}).get(path[1])


def pairing_differences(ma: dict[str, Any], mb: dict[str, Any],
                        fields: tuple[tuple[str, str], ...]) -> list[str]:
    return [f"{'.'.join(f)}: {_field(ma, f)!r} vs {_field(mb, f)!r}" for f in fields
            if _field(ma, f) != _field(mb, f)]


def reference_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """Which reference scored a cache; for a server, what it served and its probe."""
    model = manifest["reference_model"]
    found = {"backend": manifest["backend"]["name"], "model": model["path"],
             "dtype": model["dtype"], "fingerprint": model["fingerprint"]}
    server = manifest["backend"].get("server")
    if isinstance(server, dict):
        found["server_version"] = server.get("version")
    return found


def probe_difference(ma: dict[str, Any], mb: dict[str, Any]) -> float | None:
    """Max |difference| of the two servers' probe log-probs (the same probe text and ids),
    so a changed served model shows even on caches of other rows; None when not both
    caches come from a server."""
    probes = [(m["backend"].get("server") or {}).get("probe") for m in (ma, mb)]
    if not all(isinstance(p, dict) for p in probes) or \
            probes[0].get("token_ids") != probes[1].get("token_ids"):
        return None
    return float(np.abs(np.asarray(probes[0]["logprobs"], dtype=np.float64)
                        - np.asarray(probes[1]["logprobs"], dtype=np.float64)).max())


def compare_caches(a: Path, b: Path) -> dict[str, Any]:
    ca, cb = (open_cache(d, verify=False, columns=["id", *COLUMNS]) for d in (a, b))
    differ = pairing_differences(ca.manifest, cb.manifest, SAME_ROWS)
    if differ:
        raise CacheError(f"{a} and {b} were not built from the same rows ({'; '.join(differ)}): "
                         "their reference values would be compared across different "
                         "sequences; build both from the same data and preprocessing options")
    ta, tb = ca.table, cb.table
    index = {row_id: i for i, row_id in enumerate(tb["id"].to_pylist())}
    ids = ta["id"].to_pylist()
    if len(ids) != len(index) or any(i not in index for i in ids):
        raise CacheError(f"{a} and {b} do not hold the same rows (ids differ); compare caches "
                         "built from the same data and preprocessing options")
    order = np.array([index[i] for i in ids])
    out: dict[str, Any] = {
        "rows": len(ids), "differences": pairing_differences(ca.manifest, cb.manifest, COMPARED),
        "reference": {"a": reference_of(ca.manifest), "b": reference_of(cb.manifest)}}
    probe = probe_difference(ca.manifest, cb.manifest)
    if probe is not None:
        out["server_probe_max_abs_diff"] = probe
    for col in COLUMNS:
        diff = np.abs(ta[col].to_numpy() - tb[col].to_numpy()[order])
        out[col] = {"max": float(diff.max()), "mean": float(diff.mean()),
                    "median": float(np.median(diff))}
    return out
