"""Tiny, random, offline vision-language models for tests: one that transformers
(``AutoProcessor`` / ``AutoModelForImageTextToText``) and vLLM's CPU build both load.

Idefics3 is the family: a SigLIP-like vision tower, a pixel-shuffle + linear connector
and a Llama decoder (LLaVA's shape), and its vLLM module imports without torchvision
(LLaVA, LLaVA-Next/OneVision, Mistral3, Qwen2/2.5/3-VL, Gemma 3 and InternVL do not).
With ``do_image_splitting=False`` every image, whatever its size, is resized to one
square tile and becomes a fixed number of image tokens: one ``<image>`` placeholder in the
prompt expands to ``<fake_token_around_image><global-img>`` + ``<image>`` x
``image_seq_len`` + ``<fake_token_around_image>``, in transformers and vLLM alike.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
IDEFICS3_TOKENS = [FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE, GLOBAL_TOKEN]


def idefics3_image_seq_len(image_size: int, patch_size: int, scale_factor: int) -> int:
    """Image tokens per image: the patch grid, shrunk by the connector's pixel shuffle."""
    return (image_size // patch_size) ** 2 // scale_factor**2


def save_tiny_vlm_idefics3(directory: Path, tokenizer, seed: int = 0, image_size: int = 64,
                           patch_size: int = 8, scale_factor: int = 2) -> Path:
    """Write a random Idefics3 to ``directory``: vision tower 64 wide, 2 layers, 2 heads of
    32; decoder a Llama 64 wide, 2 layers, 2 heads of 32 (vLLM's CPU attention rejects
    head_dim 16); a copy of ``tokenizer`` plus the four Idefics3 special tokens; the image
    processor (PIL backend, no splitting: every image becomes one ``image_size`` square)
    and the processor config (``image_seq_len``) with the tokenizer's chat template."""
    import copy

    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    ids = dict(zip(IDEFICS3_TOKENS, tokenizer.convert_tokens_to_ids(IDEFICS3_TOKENS), strict=True))
    if len(set(ids.values())) != len(ids) or max(ids.values()) >= len(tokenizer):
        raise ValueError(f"tokenizer did not take the Idefics3 tokens: {ids}")
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                  initializer_range=0.2)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
                tie_word_embeddings=False, **special)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale_factor,
                            image_token_id=ids[IMAGE_TOKEN], tie_word_embeddings=False, **special)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size})
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer,
        image_seq_len=idefics3_image_seq_len(image_size, patch_size, scale_factor),
        chat_template=tokenizer.chat_template)
    processor.save_pretrained(directory)
    return directory
