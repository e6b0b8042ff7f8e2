"""Vision KTO benchmark rows from LLaMA-Factory's multimodal SFT demo (mllm_demo.json:
conversations with ``<image>`` placeholders in user turns and relative image paths).

Each conversation gives two rows with the same prompt (every message but the last) and
images: its own last answer (desirable) and the next conversation's last answer
(undesirable). Two files come out:

- ``kto_rows.json``: the rows for kto-precompute (``messages`` + ``label`` + ``images``);
- ``trl_rows.jsonl``: the same rows as TRL vision rows (``prompt``/``completion`` text,
  ``label``, ``images``) rendered so that TRL's own vision collator tokenizes them into
  our token ids: the prompt is the chat template's rendering (with its BOS), the
  completion is the rest of the rendering plus EOS. Each row also carries the ids our
  tokenization gives (``prompt_ids`` with every ``<image>`` expanded by the processor,
  ``completion_ids``, ``kl_completion_ids`` from the cache's KL pairing of one shard)
  for ``trl_vlm_kto.py --collator ids`` and ``--check-ids``.

    python benchmarks/vlm_rows.py --data mllm_demo.json --model M --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shared.formats import Example, RecordRef
from shared.kl import kl_partners
from shared.tokenization import (
    TokenizeOptions,
    encode_texts,
    fit_completion,
    render_texts,
    special_ids,
    truncate,
)

PLACEHOLDER = "<image>"  # LLaMA-Factory's, and the tiny LLaVA's image token


def kto_records(conversations: list[dict], root: Path) -> list[dict]:
    """Desirable and undesirable rows (messages + label + absolute image paths)."""
    n = len(conversations)
    if n < 2:
        raise SystemExit(f"Error: --data holds {n} conversation(s); the undesirable rows "
                         "borrow another conversation's answer, so at least 2 are needed")
    rows = []
    for i, conv in enumerate(conversations):
        messages = conv["messages"]
        if messages[-1]["role"] != "assistant":
            raise SystemExit(f"Error: --data record {i}: the last message must be the "
                             "assistant's answer")
        images = [str((root / p).resolve()) for p in conv.get("images", [])]
        placeholders = sum(m["content"].count(PLACEHOLDER) for m in messages[:-1])
        if placeholders != len(images):
            raise SystemExit(f"Error: --data record {i}: {placeholders} {PLACEHOLDER} "
                             f"placeholder(s) in the prompt but {len(images)} image(s); "
                             "give one image per placeholder")
        absent = [p for p in images if not Path(p).is_file()]
        if absent:
            raise SystemExit(f"Error: --data record {i}: images: no such file {absent[0]}")
        other = conversations[(i + 1) % n]["messages"][-1]
        rows.append({"messages": messages, "label": True, "images": images})
        rows.append({"messages": [*messages[:-1], other], "label": False, "images": images})
    return rows


def encode_row(record: dict, index: int, processor: Any, opts: TokenizeOptions) -> dict:
    """One TRL vision row: rendered texts and the ids our tokenization gives them."""
    from PIL import Image

    tokenizer = processor.tokenizer
    example = Example(index, "u", record["label"], record["messages"][:-1],
                      record["messages"][-1:])
    prompt_text, completion_text = render_texts(example, tokenizer, RecordRef("--data", index))
    images = [Image.open(p).convert("RGB") for p in record["images"]]
    expanded = processor(text=[prompt_text], images=[images] if images else None,
                         add_special_tokens=False)["input_ids"][0]
    bos, eos = special_ids(tokenizer)
    prompt_ids = [int(t) for t in expanded]
    if bos is not None and prompt_ids[:1] != [bos]:
        prompt_ids = [bos, *prompt_ids]
        prompt_text = tokenizer.bos_token + prompt_text
    _, (completion_ids,) = encode_texts(tokenizer, [], [completion_text])
    if not completion_text.endswith(tokenizer.eos_token):
        completion_text += tokenizer.eos_token
    prompt_ids, completion_ids = truncate(prompt_ids, completion_ids, opts)
    return {"prompt": prompt_text, "completion": completion_text, "label": record["label"],
            "images": record["images"], "prompt_ids": prompt_ids,
            "completion_ids": completion_ids}


def add_kl(rows: list[dict], seed: int, max_length: int) -> list[dict]:
    """The cache's KL completions for one shard holding every row (shared.kl)."""
    partners = kl_partners([r["prompt_ids"] for r in rows], seed, 0)
    return [{**r, "kl_completion_ids": fit_completion(r["prompt_ids"],
                                                      rows[j]["completion_ids"], max_length)}
            for r, j in zip(rows, partners, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="mllm_demo.json")
    ap.add_argument("--model", type=Path, required=True,
                    help="a model folder with its processor (the tokenizer's chat template)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=42, help="KL pairing seed (kto-precompute's)")
    args = ap.parse_args()

    from transformers import AutoProcessor

    conversations = json.loads(args.data.read_text(encoding="utf-8"))
    records = kto_records(conversations, args.data.parent)
    processor = AutoProcessor.from_pretrained(args.model)
    opts = TokenizeOptions(max_length=args.max_length)
    rows = add_kl([encode_row(r, i, processor, opts) for i, r in enumerate(records)],
                  args.seed, args.max_length)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kto_rows.json").write_text(json.dumps(records, ensure_ascii=False, indent=1))
    with (args.out / "trl_rows.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
    print(json.dumps({"rows": len(rows), "tokens_per_row": sum(lengths) / len(rows),
                      "max_tokens": max(lengths), "out": str(args.out)}))


if __name__ == "__main__":
    main()
