"""Vision-language rows, as both stages see them. A row's prompt ids hold every image's
tokens already expanded, exactly as the model's HF processor expands them, so that
kto-train feeds the model the same ids the reference scored; the row also carries its
images (encoded bytes and SHA-256, ``shared.images``) and how many tokens each image
became. kto-train runs only the image processor on the fly (pixel values and whatever
else the family needs).

The processor's settings (its image processor's resolution bounds, patching, crop,
normalization, the class that computes the pixels) are fingerprinted like the
tokenizer: kto-train refuses a policy whose processor differs."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from shared.errors import ConfigError, InputError
from shared.fingerprint import sha256_json
from shared.formats import IMAGE_MARKER, Example, RecordRef
from shared.tokenization import TokenizeOptions, render_by_difference, special_ids, truncate

log = logging.getLogger(__name__)
# The columns a vision row adds to the cache schema. Image i of a row: images[i],
# image_sha256[i], and its span of the prompt: the image_tokens[i] tokens from
# prompt_ids[image_offsets[i]] on are what its placeholder became (image tokens and the
# family's wrappers around them: row/column markers, begin/end of image).
VISION_FIELDS = (
    pa.field("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    pa.field("image_sha256", pa.list_(pa.string())),
    pa.field("image_offsets", pa.list_(pa.int32())),
    pa.field("image_tokens", pa.list_(pa.int32())),
)
VISION_COLUMNS = tuple(f.name for f in VISION_FIELDS)
# Processor attributes that decide how many tokens an image becomes (LLaVA family, Qwen2-VL,
# Gemma 3, Idefics3, ...): fingerprinted with the image processor's own settings.
# model types whose positions come from the image grids (multimodal RoPE)
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_omni", "glm4v")
_PROCESSOR_KEYS = ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy",
                   "image_token", "image_seq_length", "num_image_tokens", "merge_size")


@dataclass(frozen=True)
class VisionSpec:
    """What the stages need to know of a processor besides the processor itself."""

    image_token: str
    image_token_id: int
    settings: dict[str, Any]
    fingerprint: str


def load_processor(path: str) -> Any | None:
    """The model folder's processor when it has an image processor (a vision-language
    model), else None. No remote code."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.debug("no processor in %s (%s)", path, err)
        return None
    return processor if getattr(processor, "image_processor", None) is not None else None


def processor_settings(processor: Any) -> dict[str, Any]:
    """Everything of the processor that changes pixel values or image token counts."""
    image = processor.image_processor
    settings = {k: v for k, v in _jsonable(image.to_dict()).items()
                if k not in ("processor_class", "_processor_class")}
    settings["image_processor_class"] = type(image).__name__  # PIL and torchvision differ
    for key in _PROCESSOR_KEYS:
        value = getattr(processor, key, None)
        if value is not None:
            settings[f"processor.{key}"] = _jsonable(value)
    return settings


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def vision_spec(processor: Any, path: str) -> VisionSpec:
    token = getattr(processor, "image_token", None)
    tokenizer = processor.tokenizer
    token_id = tokenizer.convert_tokens_to_ids(token) if isinstance(token, str) else None
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"{path}: the processor names no image token its tokenizer knows "
                          f"(image_token {token!r}); this model family is not supported")
    settings = processor_settings(processor)
    return VisionSpec(token, int(token_id), settings, sha256_json(settings))


def processor_record(spec: VisionSpec, path: str) -> dict[str, Any]:
    """The manifest's ``processor`` section (part of the cache key)."""
    return {"path": path, "fingerprint": spec.fingerprint, "image_token": spec.image_token,
            "image_token_id": spec.image_token_id, "settings": spec.settings}


def processor_mismatch(cache: str, recorded: Mapping[str, Any], spec: VisionSpec,
                       name: str) -> str | None:
    """None when the policy's processor is the cache's; else what differs, and the fix."""
    if recorded.get("fingerprint") == spec.fingerprint:
        return None
    theirs = recorded.get("settings", {})
    keys = sorted(set(theirs) | set(spec.settings))
    differ = [f"{k}: {theirs.get(k)!r} (cache) vs {spec.settings.get(k)!r} (policy)"
              for k in keys if theirs.get(k) != spec.settings.get(k)][:4]
    return (f"{cache} was built with another image processor than the policy's ({name}): "
            f"{'; '.join(differ) or 'fingerprints differ'}. The reference scored other pixels "
            "or image token counts; rebuild the cache with the policy's processor "
            "(kto-precompute --tokenizer POLICY) or train the policy the cache was built for")


# ---- rendering -------------------------------------------------------------------------
def typed_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """Messages whose text holds image markers as the typed content parts processors'
    chat templates take: ``[{"type": "image"}, {"type": "text", "text": ...}]``."""
    out = []
    for m in messages:
        parts: list[dict[str, str]] = []
        for i, piece in enumerate(m["content"].split(IMAGE_MARKER)):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


def render_vision_texts(example: Example, processor: Any, ref: RecordRef) -> tuple[str, str]:
    """(prompt text, completion text) with the processor's image token once per image. Chat
    messages go through the processor's chat template (typed parts), by difference."""
    prompt, completion = example.prompt, example.completion
    token = processor.image_token
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt.replace(IMAGE_MARKER, token), completion.replace(IMAGE_MARKER, token)
    if isinstance(prompt, str) and prompt == "":
        prompt = []
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise ref.error("completion", "wrong type",
                        "prompt and completion both text or both messages", completion)
    template = getattr(processor, "chat_template", None)
    if not template:
        raise ref.error("prompt", "not renderable with the chat template",
                        "a processor with a chat template for message data", "no chat template")
    return render_by_difference(processor.apply_chat_template, typed_messages(prompt),
                                typed_messages(completion), ref)


def check_placeholders(prompt_text: str, completion_text: str, images: int, token: str,
                       ref: RecordRef) -> None:
    """One image placeholder per image, all in the prompt."""
    if token in completion_text:
        raise ref.error("completion", "image placeholder in the completion",
                        "images only in the prompt", f"{completion_text.count(token)} "
                        f"placeholder(s) {token!r}")
    found = prompt_text.count(token)
    if found != images:
        raise ref.error("images", "placeholders and images differ",
                        f"one placeholder ({IMAGE_MARKER} in text or a {{'type': 'image'}} "
                        "part) per image", f"{found} placeholder(s) and {images} image(s)")


# ---- token ids ---------------------------------------------------------------------------
def expand_prompt(processor: Any, prompt_text: str, images: list[Any],
                  bos: int | None) -> list[int]:
    """The prompt's ids with every image expanded by the processor, BOS-prefixed as
    ``shared.tokenization.encode_texts`` does."""
    ids = processor(text=[prompt_text], images=images or None,
                    add_special_tokens=False)["input_ids"][0]
    return _with_bos([int(i) for i in ids], bos)


def placeholder_prompt(tokenizer: Any, prompt_text: str, bos: int | None) -> list[int]:
    """The same prompt with one placeholder token per image (nothing expanded)."""
    return _with_bos(tokenizer(prompt_text, add_special_tokens=False)["input_ids"], bos)


def _with_bos(ids: list[int], bos: int | None) -> list[int]:
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def image_span(processor: Any, image: Any) -> list[int]:
    """The tokens one image's placeholder becomes."""
    ids = processor(text=[processor.image_token], images=[image],
                    add_special_tokens=False)["input_ids"][0]
    return [int(i) for i in ids]


def image_offsets(placeholders: Sequence[int], expanded: Sequence[int], token_id: int,
                  spans: Sequence[Sequence[int]]) -> list[int]:
    """Where each image's span starts in ``expanded``, checked: ``placeholders`` with its
    k-th placeholder token replaced by ``spans[k]`` must be exactly ``expanded``. ValueError
    otherwise (a processor that expands some other way)."""
    offsets, rebuilt, k = [], [], 0
    for t in placeholders:
        if t == token_id:
            if k >= len(spans):
                raise ValueError(f"more placeholders than the {len(spans)} images")
            offsets.append(len(rebuilt))
            rebuilt.extend(spans[k])
            k += 1
        else:
            rebuilt.append(int(t))
    if k != len(spans) or rebuilt != list(expanded):
        raise ValueError("the processor's expansion is not one span per placeholder")
    return offsets


def encode_completion(tokenizer: Any, completion_text: str) -> list[int]:
    _, eos = special_ids(tokenizer)
    ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return ids if ids[-1:] == [eos] else [*ids, eos]


def truncate_vision(prompt_ids: list[int], completion_ids: list[int], offsets: list[int],
                    lengths: list[int], opts: TokenizeOptions,
                    ref: RecordRef) -> tuple[list[int], list[int], list[int]]:
    """TRL's truncation, refused where it would cut into or drop an image's span (the
    row would hold a part of an image the pixels no longer match); returns the offsets
    in the truncated prompt."""
    p, c = truncate(prompt_ids, completion_ids, opts)
    cut = len(prompt_ids) - len(p) if opts.truncation_mode == "keep_end" else 0
    moved = [o - cut for o in offsets]
    if any(o < 0 or o + n > len(p) for o, n in zip(moved, lengths, strict=True)):
        raise InputError(ref.path, ref.index, "images", "truncation would cut an image",
                         f"a prompt whose images fit in --max-prompt-length "
                         f"{opts.max_prompt_length} (--max-length {opts.max_length})",
                         f"{len(prompt_ids)} prompt tokens, {sum(lengths)} of them images'",
                         fix="Raise --max-length / --max-prompt-length, shorten the prompt, "
                         "or pass --skip-invalid to leave such records out.")
    return p, c, moved


def collapse_images(prompt_ids: Sequence[int], offsets: Sequence[int],
                    lengths: Sequence[int], token_id: int) -> list[int]:
    """The prompt with one placeholder per image, as vLLM takes it (vLLM expands each
    placeholder itself): image i's span replaced by the placeholder token."""
    check_spans(prompt_ids, offsets, lengths, token_id)
    out: list[int] = []
    at = 0
    for o, n in zip(offsets, lengths, strict=True):
        out.extend(int(t) for t in prompt_ids[at:o])
        out.append(token_id)
        at = o + n
    out.extend(int(t) for t in prompt_ids[at:])
    return out


def check_spans(prompt_ids: Sequence[int], offsets: Sequence[int], lengths: Sequence[int],
                token_id: int) -> None:
    """Spans in order, inside the prompt, apart, each holding image tokens, and no image
    token outside them. ValueError naming what is wrong."""
    if len(offsets) != len(lengths):
        raise ValueError(f"{len(offsets)} image offsets but {len(lengths)} lengths")
    at, inside = 0, 0
    for i, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
        if o < at or n < 1 or o + n > len(prompt_ids):
            raise ValueError(f"image {i}'s span [{o}, {o + n}) is out of order or outside the "
                             f"{len(prompt_ids)}-token prompt")
        count = sum(1 for t in prompt_ids[o:o + n] if t == token_id)
        if count == 0:
            raise ValueError(f"image {i}'s span holds no image token")
        inside += count
        at = o + n
    if sum(1 for t in prompt_ids if t == token_id) != inside:
        raise ValueError("image tokens outside the images' spans")


def image_inputs(processor: Any, images: list[Any]) -> dict[str, Any]:
    """The image processor's tensors for a batch's images in order (pixel values and the
    family's extras: image sizes, grids, pixel attention masks)."""
    if not images:
        return {}
    return dict(processor.image_processor(images=images, return_tensors="pt"))


def check_vision_rows(table: pa.Table, image_token_id: int) -> str | None:
    """What is wrong with a shard's vision columns (None when nothing): every image's bytes
    must hash to its recorded SHA-256, and each row's image spans must be well formed
    (``check_spans``)."""
    columns = table.to_pydict()
    for r, (prompt, images, hashes, offsets, counts) in enumerate(zip(
            columns["prompt_ids"], columns["images"], columns["image_sha256"],
            columns["image_offsets"], columns["image_tokens"], strict=True)):
        if not len(images) == len(hashes) == len(counts):
            return f"row {r} lists {len(images)} images, {len(hashes)} hashes, {len(counts)} counts"
        for i, (image, digest) in enumerate(zip(images, hashes, strict=True)):
            if image is None or image.get("bytes") is None:
                return f"row {r} image {i} has no bytes"
            if hashlib.sha256(image["bytes"]).hexdigest() != digest:
                return f"row {r} image {i}'s bytes do not match its SHA-256"
        try:
            check_spans(prompt, offsets, counts, image_token_id)
        except ValueError as err:
            return f"row {r}: {err}"
    return None


def images_digest(hash_lists) -> str:
    """One SHA-256 over every row's image hashes, in row order."""
    h = hashlib.sha256()
    for hashes in hash_lists:
        h.update((",".join(hashes or []) + "\n").encode())
    return h.hexdigest()


def check_family(config: Any, path: str) -> None:
    """Families whose positions depend on the images (Qwen2-VL's multimodal RoPE: the model
    derives 3-D positions from the image grids) need positions both stages do not build
    yet: refused rather than scored with the wrong positions."""
    text = config.get_text_config()
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    mrope = isinstance(rope, Mapping) and "mrope_section" in rope
    if mrope or str(getattr(config, "model_type", "")).startswith(MROPE_FAMILIES):
        raise ConfigError(f"{path}: {config.model_type} uses multimodal rotary positions "
                          "(mrope), which kto-cache does not build yet; LLaVA-style models "
                          "are supported (docs/vision.md)")
