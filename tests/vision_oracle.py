"""The naive oracle of the vision-language tests and benchmarks: one sequence at a time, no
padding, the model's own forward and full logits (float32), the completion's log-probs
summed in float64."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.images import decode


def naive_logps(model, processor, prompt: list[int], completion: list[int],
                images: list[bytes]) -> float:
    """One sequence, no padding, the model's own forward and full logits (float32),
    the completion's log-probs summed in float64."""
    ids = torch.tensor([prompt + completion])
    pixels = (processor.image_processor(images=[decode(b) for b in images],
                                        return_tensors="pt") if images else {})
    with torch.no_grad():
        logits = model(input_ids=ids, **pixels).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(lp[len(prompt) - 1:].double().sum())


def check_against_oracle(reference: Path, cache: Path, tolerance: float = 1e-3) -> float:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(reference, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(reference)
    from shared.dataset import open_cache

    table = open_cache(cache).table
    worst = 0.0
    for row in table.to_pylist():
        images = [i["bytes"] for i in row["images"]]
        for column, completion in (("ref_logps", row["completion_ids"]),
                                   ("ref_kl_logps", row["kl_completion_ids"])):
            want = naive_logps(model, processor, row["prompt_ids"], completion, images)
            worst = max(worst, abs(want - row[column]))
    assert worst <= tolerance, worst
    return worst
