"""kto-train for vision-language policies: the cache's rows already hold every image's
tokens (expanded by the processor when the cache was built), so a batch needs only the
image processor's tensors, computed on the fly from the images the cache carries. Target
and KL sequences of a row share its prompt and so its images (the same tensors).

The policy's processor must be the cache's (``shared.vision``: the same image
settings and image token), else the policy would see other pixels than the reference
scored. The vision tower and the projector are frozen by default (LLaMA-Factory's
``freeze_vision_tower`` / ``freeze_multi_modal_projector``); LoRA, when on, adapts only
the language model's linear layers."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.errors import CacheError, ConfigError
from shared.images import decode
from shared.vision import (
    VISION_COLUMNS,
    image_inputs,
    image_span,
    load_processor,
    processor_mismatch,
    vision_spec,
)

log = logging.getLogger(__name__)
# Module names of the vision tower and of the projector, across transformers' families
# (LLaVA and its variants, Gemma 3, PaliGemma, Mistral 3, Idefics3, Qwen2-VL's ``visual``
# with its ``merger``).
TOWER_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "merger", "connector")


def is_vision_cache(manifest: dict[str, Any]) -> bool:
    return "processor" in manifest


def policy_processor(manifest: dict[str, Any], path: str, cache: str) -> Any:
    """The policy's processor, checked against the one the cache was built with."""
    processor = load_processor(path)
    if processor is None:
        raise CacheError(f"{cache} holds images, but {path} has no image processor (no "
                         "processor_config.json / preprocessor_config.json): train a "
                         "vision-language policy, the one the cache was built for")
    spec = vision_spec(processor, path)
    problem = processor_mismatch(cache, manifest["processor"], spec, path)
    if problem:
        raise CacheError(problem)
    if spec.image_token_id != manifest["processor"]["image_token_id"]:
        raise CacheError(f"{cache}: image token id {manifest['processor']['image_token_id']} "
                         f"in the cache, {spec.image_token_id} in {path}'s processor")
    return processor


@dataclass
class ImageBatcher:
    """The image tensors of each micro-batch. Each distinct image (by SHA-256) is checked
    once, the first time a batch holds it: the tokens the cache recorded for it must be the
    policy processor's expansion of it, or the model would pair image features with the
    wrong tokens (an edited cache the checksums cannot catch)."""

    processor: Any
    dtype: torch.dtype
    checked: set[str] = field(default_factory=set)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        pictures = []
        for r, row in enumerate(batch["images"]):
            for i, image in enumerate(row):
                picture = _decode_cached(image["bytes"])
                digest = batch["image_sha256"][r][i]
                if digest not in self.checked:
                    o, n = batch["image_offsets"][r][i], batch["image_tokens"][r][i]
                    self._check_span(batch["prompt_ids"][r][o:o + n], picture, batch["id"][r],
                                     i)
                    self.checked.add(digest)
                pictures.append(picture)
        return {k: (v.to(self.dtype) if v.is_floating_point() else v)
                for k, v in image_inputs(self.processor, pictures).items()}

    def _check_span(self, recorded: list[int], picture: Any, row: str, index: int) -> None:
        expected = image_span(self.processor, picture)
        if recorded != expected:
            raise CacheError(f"row {row!r}, image {index}: the cache records {len(recorded)} "
                             f"tokens for it, the policy's processor expands it to "
                             f"{len(expected)} (or to other tokens): damaged or edited; rebuild "
                             "it with kto-precompute")


def _decode_cached(data: bytes) -> Any:
    """A cached image as RGB; one the cache holds but PIL cannot decode (an edited cache:
    its SHA-256 and the manifest were made to match) is a CacheError naming it."""
    try:
        return decode(data)
    except Exception as err:  # PIL raises many kinds for bad files (and bombs)
        digest = hashlib.sha256(data).hexdigest()
        raise CacheError(f"the cache holds an image that cannot be decoded (SHA-256 "
                         f"{digest[:16]}..., {len(data)} bytes: {type(err).__name__}: "
                         f"{str(err)[:80]}): damaged or edited; rebuild it with "
                         "kto-precompute") from None


def module_parts(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """Dotted names of the outermost modules whose own name is one of ``names``."""
    found: list[str] = []
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in names and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def freeze_vision_parts(model: torch.nn.Module, tower: bool, projector: bool) -> dict[str, int]:
    """requires_grad off for the vision tower and/or the projector; returns the frozen
    parameter counts. A model with neither part is a configuration error."""
    towers, projectors = module_parts(model, TOWER_NAMES), module_parts(model, PROJECTOR_NAMES)
    if not towers:
        raise ConfigError(f"{type(model).__name__}: no vision tower found (modules named "
                          f"{', '.join(TOWER_NAMES)}); this model family is not supported")
    frozen = {"vision_tower": 0, "multi_modal_projector": 0}
    for name, p in model.named_parameters():
        in_projector = any(name.startswith(m + ".") for m in projectors)
        in_tower = any(name.startswith(m + ".") for m in towers) and not in_projector
        if (tower and in_tower) or (projector and in_projector):
            p.requires_grad_(False)
            frozen["vision_tower" if in_tower else "multi_modal_projector"] += p.numel()
    log.info("frozen: vision tower %d parameters, projector %d", frozen["vision_tower"],
             frozen["multi_modal_projector"])
    return frozen


def lora_exclusions(model: torch.nn.Module) -> list[str]:
    """Modules LoRA leaves alone on a vision-language policy: the tower and the projector
    (LoRA adapts the language model, as LLaMA-Factory does by default)."""
    return module_parts(model, TOWER_NAMES) + module_parts(model, PROJECTOR_NAMES)


__all__ = ["VISION_COLUMNS", "ImageBatcher", "freeze_vision_parts", "is_vision_cache",
           "lora_exclusions", "policy_processor"]
