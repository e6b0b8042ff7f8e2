"""Truncation (hand-worked), BOS/EOS rules and chat rendering by difference."""

from __future__ import annotations

import pytest

from shared.errors import ConfigError, InputError
from shared.formats import Example, RecordRef
from shared.tokenization import (
    TokenizeOptions,
    check_lengths,
    encode_texts,
    fit_completion,
    render_texts,
    truncate,
)

REF = RecordRef("data.jsonl", 3)


def opts(max_length, max_prompt_length, mode="keep_end"):
    return TokenizeOptions(max_length, max_prompt_length, mode)


@pytest.mark.parametrize("p,c,o,expected", [
    # fits: untouched, even when the prompt alone exceeds max_prompt_length
    ([1, 2, 3, 4, 5], [6, 7], opts(7, 2), ([1, 2, 3, 4, 5], [6, 7])),
    # too long, prompt within max_prompt_length: only the completion is cut (6 - 3 = 3)
    ([1, 2, 3], [4, 5, 6, 7, 8, 9, 10], opts(6, 4), ([1, 2, 3], [4, 5, 6])),
    # prompt cut to its last 4 tokens, completion to 8 - 4 = 4
    ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], opts(8, 4), ([3, 4, 5, 6], [7, 8, 9, 10])),
    # keep_start keeps the first 4 prompt tokens instead
    ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], opts(8, 4, "keep_start"),
     ([1, 2, 3, 4], [7, 8, 9, 10])),
    # prompt cut makes room: completion survives whole (3 + 3 <= 6)
    ([1, 2, 3, 4, 5], [6, 7, 8], opts(6, 3), ([3, 4, 5], [6, 7, 8])),
])
def test_truncation_hand_worked(p, c, o, expected):
    assert truncate(p, c, o) == expected


def test_prompt_filling_max_length_leaves_no_completion_and_is_invalid():
    p, c = truncate([1, 2, 3, 4, 5], [6, 7], opts(4, 4))
    assert (p, c) == ([2, 3, 4, 5], [])
    err = check_lengths(p, c, REF, opts(4, 4))
    assert isinstance(err, InputError) and err.reason == "prompt longer than max_length"
    assert "data.jsonl: record 3, field 'completion'" in str(err)


def test_kl_completion_is_cut_to_fit_after_the_prompt():
    assert fit_completion([1, 2, 3], [4, 5, 6, 7], max_length=5) == [4, 5]
    assert fit_completion([1], [4, 5], max_length=5) == [4, 5]


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="--max-prompt-length 9 must be between 1 and"):
        TokenizeOptions(8, 9)
    with pytest.raises(ConfigError, match="--truncation-mode"):
        TokenizeOptions(8, 4, "middle")


def test_bos_added_once_and_eos_appended_once(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    (p1, p2), (c1, c2) = encode_texts(tokenizer, ["Hello", "<s>Hello"], ["world", "world</s>"])
    assert p1 == p2 == [bos, *tokenizer("Hello", add_special_tokens=False)["input_ids"]]
    assert c1 == c2 == [*tokenizer("world", add_special_tokens=False)["input_ids"], eos]


def test_chat_completion_is_full_rendering_minus_prompt_rendering(tokenizer):
    ex = Example(0, "u", True, [{"role": "user", "content": "Hi"}],
                 [{"role": "assistant", "content": "Hello"}])
    prompt, completion = render_texts(ex, tokenizer, REF)
    assert prompt == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert completion == "Hello<|im_end|>\n"
    (p,), (c,) = encode_texts(tokenizer, [prompt], [completion])
    assert p[0] == tokenizer.bos_token_id and p.count(tokenizer.bos_token_id) == 1
    assert c[-1] == tokenizer.eos_token_id and tokenizer.decode(c) == "Hello<|im_end|>\n</s>"


def test_messages_without_chat_template_is_a_clear_error(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ex = Example(0, "u", True, [{"role": "user", "content": "Hi"}],
                 [{"role": "assistant", "content": "Hello"}])
    with pytest.raises(InputError, match="not renderable with the chat template"):
        render_texts(ex, plain, REF)


def test_template_whose_prompt_is_not_a_prefix_is_an_error(tokenizer):
    import copy

    odd = copy.deepcopy(tokenizer)  # renders the generation prompt differently from a turn
    odd.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ex = Example(0, "u", True, [{"role": "user", "content": "Hi"}],
                 [{"role": "assistant", "content": "Hello"}])
    with pytest.raises(InputError, match="prompt rendering to be a prefix"):
        render_texts(ex, odd, REF)


def test_text_prompt_with_message_completion_is_rejected(tokenizer):
    ex = Example(0, "u", True, "Hi", [{"role": "assistant", "content": "Hello"}])
    with pytest.raises(InputError, match="both text or both messages"):
        render_texts(ex, tokenizer, REF)
