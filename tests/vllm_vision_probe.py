"""Probe: does vLLM's prompt-logprob scoring of image + text rows agree with transformers?

Builds the tiny random Idefics3 of tests/tiny_vision_vllm.py, then for a few prompts with
1-2 random images (different sizes) scores prompt + completion with vLLM (token-id prompt
holding ONE ``<image>`` placeholder per image, ``multi_modal_data``) and with transformers
float32 on the HF processor's expanded ids + pixel values, one sequence at a time, and
prints lengths, completion log-prob sums, their max |diff| and timings, then what vLLM
does with prompts whose placeholders do not match their images. Exit status 0 only when
vLLM's expanded ids equal the HF processor's and every sum agrees within TOLERANCE.

    cd REPO && PYTHONPATH=$PWD VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 \\
        python tests/vllm_vision_probe.py [--skip-tokenizer-init] [--model-dir DIR]

Not a test (it starts a vLLM engine: slow, and vLLM is optional).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 1e-4  # fp32 vLLM vs transformers on this tiny model: about 1e-5 per sum
ROWS = [  # (prompt text with one <image> per image, completion text, image sizes (w, h))
    ("<|im_start|>user\n<image>What is in the picture?<|im_end|>\n<|im_start|>assistant\n",
     "A small red box on a table.<|im_end|>", [(40, 70)]),
    ("<|im_start|>user\nCompare <image> and <image> please.<|im_end|>\n<|im_start|>assistant\n",
     "The first one is brighter than the second.<|im_end|>", [(64, 64), (23, 91)]),
    ("<|im_start|>user\n<image>\nDescribe it in one word.<|im_end|>\n<|im_start|>assistant\n",
     "Noise.<|im_end|>", [(120, 33)]),
    ("<|im_start|>user\nHere: <image><image> Which is larger?<|im_end|>\n<|im_start|>assistant\n",
     "They are the same size, I think, but the colours differ.<|im_end|>", [(17, 17), (200, 150)]),
]


def random_image(size: tuple[int, int], seed: int):
    import numpy as np
    from PIL import Image

    w, h = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def build_rows(processor) -> list[dict]:
    """Per row: vLLM ids (one placeholder per image), HF-expanded ids, pixel tensors and
    the completion's token ids (tokenized alone, appended to both)."""
    tok = processor.tokenizer
    rows = []
    for r, (prompt, completion, sizes) in enumerate(ROWS):
        images = [random_image(s, 100 * r + i) for i, s in enumerate(sizes)]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
        hf = processor(text=[prompt], images=[images], return_tensors="pt",
                       add_special_tokens=False)
        rows.append(dict(images=images, vllm_ids=prompt_ids + completion_ids,
                         hf_ids=hf["input_ids"][0].tolist() + completion_ids,
                         pixel_values=hf["pixel_values"],
                         pixel_attention_mask=hf["pixel_attention_mask"],
                         completion_ids=completion_ids,
                         n_placeholders=prompt_ids.count(processor.image_token_id)))
    return rows


def hf_completion_sum(model, row: dict, pixel_values) -> float:
    import torch

    ids = torch.tensor([row["hf_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values,
                       pixel_attention_mask=row["pixel_attention_mask"]).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logp[-len(row["completion_ids"]):].sum())


def hf_scores(model_dir: Path, rows: list[dict]) -> tuple[list[float], float, float]:
    """Completion sums, seconds, and how far row 0's sum moves when its image is
    mirrored (the agreement below means something only if images matter)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    start = time.perf_counter()
    sums = [hf_completion_sum(model, row, row["pixel_values"]) for row in rows]
    seconds = time.perf_counter() - start
    mirrored = hf_completion_sum(model, rows[0], torch.flip(rows[0]["pixel_values"], dims=[-1]))
    return sums, seconds, abs(mirrored - sums[0])


def edge_cases(llm, params, rows: list[dict], image_token_id: int) -> list[str]:
    """What vLLM does with prompts whose placeholders do not match their images."""
    row, extra = rows[0], random_image((50, 50), 7)
    one = row["vllm_ids"]
    first = one.index(image_token_id)
    padded = one + [one[-1]] * (511 - len(one))  # 511 ids: fits before expansion, not after
    cases = {
        "already-expanded ids + its image": (row["hf_ids"], row["images"]),
        "2 placeholders + 1 image": (one[:first] + [image_token_id] + one[first:], row["images"]),
        "1 placeholder + 2 images": (one, [*row["images"], extra]),
        "0 placeholders + 1 image": (one[:first] + one[first + 1:], row["images"]),
        "511 ids + 1 image (max_model_len 512)": (padded, row["images"]),
    }
    lines = []
    for name, (ids, images) in cases.items():
        prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}
        try:
            out = list(llm.generate([prompt], params, use_tqdm=False)[0].prompt_token_ids)
            lines.append(f"{name}: accepted: {len(ids)} ids ({ids.count(image_token_id)} <image>)"
                         f" -> {len(out)} prompt_token_ids ({out.count(image_token_id)} <image>)")
        except Exception as exc:  # noqa: BLE001 - a probe reports whatever vLLM raises
            lines.append(f"{name}: {type(exc).__name__}: {str(exc)[:160]}")
    return lines


def vllm_scores(model_dir: Path, rows: list[dict], skip_tokenizer_init: bool,
                image_token_id: int) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), skip_tokenizer_init=skip_tokenizer_init, dtype="float32",
              enforce_eager=True, max_model_len=512, seed=0, limit_mm_per_prompt={"image": 2})
    start_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    prompts = [{"prompt_token_ids": r["vllm_ids"], "multi_modal_data": {"image": r["images"]}}
               for r in rows]
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    score_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)  # again, warm (the first call sets things up)
    rescore_s = time.perf_counter() - t1
    result = dict(start_s=start_s, score_s=score_s, rescore_s=rescore_s, sums=[], lengths=[],
                  expanded_ids=[], per_token=[])
    for row, out in zip(rows, outs, strict=True):
        completion = row["completion_ids"]
        tail = out.prompt_logprobs[-len(completion):]
        values = [entry[tid].logprob for entry, tid in zip(tail, completion, strict=True)]
        result["sums"].append(sum(values))
        result["per_token"].append(values)
        result["lengths"].append((len(out.prompt_logprobs), len(out.prompt_token_ids)))
        result["expanded_ids"].append(list(out.prompt_token_ids))
    result["edge_cases"] = edge_cases(llm, params, rows, image_token_id)
    t2 = time.perf_counter()
    del llm
    gc.collect()
    result["shutdown_s"] = time.perf_counter() - t2
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-tokenizer-init", action="store_true")
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoProcessor

    from tests import tiny, tiny_vision_vllm
    from train import demo

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp) / "idefics3"
        if not (model_dir / "config.json").exists():
            tokenizer = demo.build_tokenizer(tiny.corpus())
            tiny_vision_vllm.save_tiny_vlm_idefics3(model_dir, tokenizer)
        processor = AutoProcessor.from_pretrained(model_dir)
        print(f"processor: {type(processor).__name__} / "
              f"{type(processor.image_processor).__name__}, "
              f"image_seq_len {processor.image_seq_len}")
        rows = build_rows(processor)
        hf_sums, hf_s, image_effect = hf_scores(model_dir, rows)
        v = vllm_scores(model_dir, rows, args.skip_tokenizer_init, processor.image_token_id)
        worst, all_same = 0.0, True
        for i, row in enumerate(rows):
            diff = abs(v["sums"][i] - hf_sums[i])
            worst = max(worst, diff)
            same = v["expanded_ids"][i] == row["hf_ids"]
            all_same = all_same and same
            print(f"row {i}: images {len(row['images'])} placeholders {row['n_placeholders']} | "
                  f"vllm ids in {len(row['vllm_ids'])} -> prompt_logprobs {v['lengths'][i][0]} / "
                  f"prompt_token_ids {v['lengths'][i][1]} | HF expanded {len(row['hf_ids'])} "
                  f"(ids identical: {same}) | completion {len(row['completion_ids'])} tokens: "
                  f"vllm {v['sums'][i]:.6f} hf {hf_sums[i]:.6f} |diff| {diff:.2e}")
        print(f"max |diff| of completion sums: {worst:.2e}")
        print(f"row 0's HF sum moves by {image_effect:.3f} when its image is mirrored")
        for line in v["edge_cases"]:
            print(f"edge case: {line}")
        print(f"timings: vLLM engine start {v['start_s']:.1f} s, vLLM scoring {len(rows)} rows "
              f"{v['score_s']:.2f} s (again, warm: {v['rescore_s']:.2f} s), "
              f"shutdown {v['shutdown_s']:.1f} s, HF fp32 scoring {hf_s:.2f} s")
    agree = all_same and worst < TOLERANCE and image_effect > 100 * TOLERANCE
    print("AGREE" if agree else "DISAGREE", f"(tolerance {TOLERANCE:g} nats per completion sum)")
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()
