"""Reference scorers for vision-language models. Each takes, beside the (prompt ids,
completion ids) pairs, every pair's images (encoded bytes) and how many prompt tokens each
image became (``shared.vision``).

hf: the model's image-text-to-text class on the cache's ids, whose images are already
expanded, with the image processor's pixel values; the completion positions go through
the chunked LM head as for text. vLLM (``vllm_vision``): the prompt with one placeholder
per image and ``multi_modal_data``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from precompute.prepare_vision import VisionEncoder
from precompute.scoring import Pair, vllm_installed
from precompute.scoring.hf import HFScorer
from shared.errors import ConfigError
from shared.images import decode
from shared.vision import image_inputs

log = logging.getLogger(__name__)
# a row's image bytes and their spans in the prompt (offsets, lengths)
RowImages = tuple[list[bytes], list[int], list[int]]


class HFVisionScorer(HFScorer):
    name = "hf"

    def __init__(self, model_path: str, processor, dtype: str, batch_tokens: int | None,
                 max_length: int = 1024):
        self.processor = processor
        super().__init__(model_path, dtype, batch_tokens, max_length)
        self._probe(model_path)

    def _probe(self, model_path: str) -> None:
        """One grey image through the processor and the model before any shard: a processor
        that does not fit the model's vision tower is named here, not mid-run."""
        from PIL import Image

        image = Image.new("RGB", (64, 64), (128, 128, 128))
        try:
            inputs = self.processor(text=[self.processor.image_token], images=[image],
                                    return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                self.model(**{k: (v.to(self.device, self.model.dtype) if v.is_floating_point()
                                  else v.to(self.device)) for k, v in inputs.items()})
        except Exception as err:  # the families raise ValueError, RuntimeError, ...
            raise ConfigError(f"{model_path}: the processor's images do not fit the model "
                              f"({type(err).__name__}: {str(err)[:200]}); use the processor "
                              "saved with the model") from None

    @staticmethod
    def _load(model_path: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)

    def score(self, pairs: Sequence[Pair], images: Sequence[RowImages] = ()) -> np.ndarray:
        if len(images) != len(pairs):
            raise ValueError(f"{len(pairs)} pairs but images for {len(images)}")
        return self._score_all(pairs, lambda rows: self._score_batch(
            [pairs[i] for i in rows], **self._pixels([images[i] for i in rows])))

    def _pixels(self, images: Sequence[RowImages]) -> dict[str, torch.Tensor]:
        """The image processor's tensors for the batch's images, in prompt order."""
        pictures = [decode(data) for row, _, _ in images for data in row]
        dtype = self.model.dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in image_inputs(self.processor, pictures).items()}


def make_vision_scorer(backend: str, config, vision: VisionEncoder, longest: int,
                       max_images: int = 1):
    """The scorer of ``backend`` for a vision-language reference (``max_images``: the most
    images one row holds)."""
    if backend == "hf":
        return HFVisionScorer(config.model, vision.processor, config.dtype, config.batch_tokens,
                              max_length=longest)
    if backend == "vllm":
        if not vllm_installed():
            raise ConfigError("--backend vllm: vLLM is not installed (pip install "
                              "'kto-cache[gpu]' or '[cpu]'), or use --backend hf")
        from precompute.scoring.vllm_vision import VLLMVisionScorer

        return VLLMVisionScorer(config, vision.spec, max_model_len=longest + 1,
                                max_images=max_images)
    raise ConfigError(f"--backend {backend} does not score vision-language models; use hf or "
                      "vllm")
