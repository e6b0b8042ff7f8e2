"""vLLM scorer for vision-language models. vLLM expands image placeholders itself (and
silently expands an already-expanded prompt a second time), so each prompt goes in with
one placeholder per image, its span of the cache's expanded prompt collapsed
(``shared.vision.collapse_images``), and the images as ``multi_modal_data``. vLLM's
expanded prompt (``output.prompt_token_ids``) must then be exactly the cache's ids, the
HF processor's expansion: a row where it is not is an error naming the row, never a
silent misalignment. The completion's log-probs are the tail of ``prompt_logprobs``.

vLLM's multimodal processing needs the tokenizer (``skip_tokenizer_init=True`` is refused
for these models), so the engine loads it; prompts stay token ids. The selected-token
API is not used for images: the per-position path is checked against the expansion."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from precompute.scoring import Pair
from precompute.scoring.vllm_backend import VLLMScorer, sum_prompt_logprobs
from shared.errors import RowScoreError
from shared.images import decode
from shared.vision import VisionSpec, collapse_images

log = logging.getLogger(__name__)


class VLLMVisionScorer(VLLMScorer):
    name = "vllm"

    def __init__(self, config, spec: VisionSpec, *, max_model_len: int, max_images: int):
        self.spec = spec
        super().__init__(config.model, config.dtype, max_model_len=max_model_len,
                         tensor_parallel_size=config.tensor_parallel_size,
                         gpu_memory_utilization=config.gpu_memory_utilization,
                         cpu_kv_cache_gib=config.cpu_kv_cache_gib, seed=config.seed,
                         max_num_batched_tokens=config.max_num_batched_tokens,
                         engine_args={"skip_tokenizer_init": False,
                                      "limit_mm_per_prompt": {"image": max(1, max_images)}})
        self.selected = False

    def score(self, pairs: Sequence[Pair], images=()) -> np.ndarray:
        from vllm import SamplingParams

        if len(images) != len(pairs):
            raise ValueError(f"{len(pairs)} pairs but images for {len(images)}")
        prompts = [vision_prompt(pair, row, self.spec.image_token_id)
                   for pair, row in zip(pairs, images, strict=True)]
        flat = {"flat_logprobs": True} if self.flat else {}
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, **flat)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        for index, (output, (p, c)) in enumerate(zip(outputs, pairs, strict=True)):
            check_expansion(index, list(output.prompt_token_ids), [*p, *c])
        return np.array([sum_prompt_logprobs(o, pair) for o, pair in zip(outputs, pairs,
                                                                         strict=True)])


def vision_prompt(pair: Pair, row, token_id: int) -> dict:
    """vLLM's prompt: the row's ids with one placeholder per image, and its images."""
    prompt, completion = pair
    data, offsets, lengths = row
    ids = collapse_images(prompt, offsets, lengths, token_id) + [int(t) for t in completion]
    if not data:
        return {"prompt_token_ids": ids}
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": [decode(b) for b in data]}}


def check_expansion(index: int, seen: list[int], expected: list[int]) -> None:
    if seen == expected:
        return
    first = next((i for i, (a, b) in enumerate(zip(seen, expected, strict=False)) if a != b),
                 min(len(seen), len(expected)))
    raise RowScoreError(index, f"vLLM expanded the prompt to {len(seen)} tokens, the HF "
                        f"processor to {len(expected)} (first difference at position {first}): "
                        "the two processors disagree on this row's images; score with "
                        "--backend hf")
