"""Vision-language scoring agreement: the hf and vLLM backends against a naive
one-sequence-at-a-time oracle (the model's own forward, full logits, float32), on the tests'
tiny LLaVA (hf only: vLLM's CPU build cannot load LLaVA) and tiny Idefics3 (both backends),
with LLaMA-Factory's mllm_demo.json made into KTO rows (each conversation desirable, and
undesirable with the next conversation's answer).

    python benchmarks/vlm_agreement.py --data mllm_demo.json --out runs/bench/vlm-agreement
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import checked, command_line, measure, table, write  # noqa: E402


def kto_rows(data: Path, out: Path) -> Path:
    """``vlm_rows.kto_records``: the demo's conversations as KTO rows, absolute image paths."""
    from vlm_rows import kto_records

    rows = kto_records(json.loads(data.read_text(encoding="utf-8")), data.parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kto_rows.json").write_text(json.dumps(rows))
    return out / "kto_rows.json"


def precompute(model: Path, data: Path, out: Path, backend: str) -> Path:
    if not (out / "manifest.json").is_file():
        checked(measure([sys.executable, "-m", "precompute.cli", "--model", str(model),
                         "--data", str(data), "--output", str(out), "--backend", backend,
                         "--dtype", "float32", "--overwrite"]), f"kto-precompute {backend}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="LLaMA-Factory's mllm_demo.json")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(args.out))

    from tests.tiny_vision import save_tiny_idefics3, save_tiny_llava
    from tests.vision_oracle import check_against_oracle

    rows = kto_rows(args.data, args.out)
    models = {"tiny LLaVA": save_tiny_llava(args.out / "llava"),
              "tiny Idefics3": save_tiny_idefics3(args.out / "idefics3")}
    results, lines = {}, []
    for name, model in models.items():
        backends = ["hf"] + (["vllm"] if name == "tiny Idefics3"
                             and importlib.util.find_spec("vllm") else [])
        found = {b: check_against_oracle(model, precompute(model, rows, args.out /
                                                           f"{model.name}-{b}", b), 1.0)
                 for b in backends}
        results[name] = found
        lines.append([name, *(f"{found[b]:.1e}" if b in found else "not run"
                              for b in ("hf", "vllm"))])
    md = (f"`{command_line()}`: largest |difference| per sequence (nats), target and KL "
          "sequences, against the naive oracle.\n\n"
          + table(["model", "hf vs oracle", "vLLM vs oracle"], lines))
    write(args.out, "vlm_agreement", results, md)


if __name__ == "__main__":
    main()
