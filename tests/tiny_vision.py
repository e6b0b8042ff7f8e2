"""A tiny, deterministic, local LLaVA-style vision-language model for tests (no network):
a CLIP vision tower (32x32 images, 8x8 patches: 16 image tokens per image) and a Llama
decoder with head_dim 32, the tests' tokenizer plus an ``<image>`` token, and a
LlavaProcessor with the PIL image processor (no torchvision needed)."""

from __future__ import annotations

from pathlib import Path

from tests import tiny
from train import demo

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH = 32, 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2
# the tests' ChatML template, taking text or typed content parts (as LLaVA's templates do)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_vision_tokenizer():
    tokenizer = demo.build_tokenizer(tiny.corpus())
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def build_processor(tokenizer, image_size: int = IMAGE_SIZE):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_llava(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64):
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                       intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                       max_position_embeddings=2048, initializer_range=0.2,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def save_tiny_llava(directory: Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    """Model, tokenizer and processor in one folder (AutoProcessor and
    AutoModelForImageTextToText load it)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_vision_tokenizer()
    build_llava(tokenizer, seed).save_pretrained(directory)
    build_processor(tokenizer, image_size).save_pretrained(directory)
    return directory


def random_image(seed: int, width: int = 40, height: int = 36):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


if __name__ == "__main__":  # python -m tests.tiny_vision DIR
    import sys

    print(save_tiny_llava(Path(sys.argv[1])))


def save_tiny_idefics3(directory: Path, seed: int = 0) -> Path:
    """A tiny Idefics3 (tiny_vision_vllm) with the tests' vision tokenizer and its template:
    a family whose vLLM module loads on the CPU build, wrapping each image's 16 tokens in
    markers (19 tokens per image)."""
    from tests.tiny_vision_vllm import save_tiny_vlm_idefics3

    return save_tiny_vlm_idefics3(directory, build_vision_tokenizer(), seed=seed)
