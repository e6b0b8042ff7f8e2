"""Turn examples into token ids exactly as spec section 2 says: chat rendering by
difference, BOS on the prompt and EOS on the completion (TRL's rules), then
TRL's truncation. Both stages call these functions; nothing else tokenizes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError, InputError
from shared.formats import Example, RecordRef

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass(frozen=True)
class TokenizeOptions:
    """``max_prompt_length`` None means half of ``max_length`` (512 for the default 1024,
    TRL 0.x's pair of defaults): users of TRL 1.x and LLaMA-Factory set only max_length."""

    max_length: int = 1024
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"

    def __post_init__(self) -> None:
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(f"--truncation-mode {self.truncation_mode!r}: expected one of "
                              f"{', '.join(TRUNCATION_MODES)}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length {self.max_length}: a row needs at least 2 tokens "
                              "(a prompt token and a completion token)")
        if self.max_prompt_length is None:
            object.__setattr__(self, "max_prompt_length", self.max_length // 2)
        if not 1 <= self.max_prompt_length <= self.max_length:
            raise ConfigError(
                f"--max-prompt-length {self.max_prompt_length} must be between 1 and "
                f"--max-length {self.max_length}; lower it, or leave it out to use half of "
                f"--max-length ({self.max_length // 2})")


@dataclass(frozen=True)
class TokenizedRow:
    id: str
    source_index: int
    label: bool
    prompt_ids: list[int]
    completion_ids: list[int]


def row_id(example: Example) -> str:
    """Stable id: record index, side of the pair and a hash of the content."""
    content = json.dumps([example.prompt, example.completion], sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:12]
    return f"{example.source_index}-{example.side}-{digest}"


def truncate(prompt_ids: Sequence[int], completion_ids: Sequence[int],
             opts: TokenizeOptions) -> tuple[list[int], list[int]]:
    """TRL's rule: if too long, cut the prompt to max_prompt_length (keeping its end or
    start), then cut the completion to what is left of max_length."""
    p, c = list(prompt_ids), list(completion_ids)
    if len(p) + len(c) <= opts.max_length:
        return p, c
    if len(p) > opts.max_prompt_length:
        keep = opts.max_prompt_length
        p = p[-keep:] if opts.truncation_mode == "keep_end" else p[:keep]
    return p, c[: max(opts.max_length - len(p), 0)]


def fit_completion(prompt_ids: Sequence[int], completion_ids: Sequence[int],
                   max_length: int) -> list[int]:
    """A KL partner's completion, cut to fit after this row's (already truncated) prompt."""
    return list(completion_ids[: max(max_length - len(prompt_ids), 0)])


def render_texts(example: Example, tokenizer: Any, ref: RecordRef) -> tuple[str, str]:
    """(prompt text, completion text). Chat messages go through the chat template and the
    completion is the full rendering minus the prompt rendering."""
    prompt, completion = example.prompt, example.completion
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    if isinstance(prompt, str) and prompt == "":
        prompt = []
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise ref.error("completion", "wrong type",
                        "prompt and completion both text or both messages", completion)
    if not getattr(tokenizer, "chat_template", None):
        raise ref.error("prompt", "not renderable with the chat template",
                        "a tokenizer with a chat template for message data", "no chat template")
    return render_by_difference(tokenizer.apply_chat_template, prompt, completion, ref)


def render_by_difference(apply_chat_template: Any, prompt: list, completion: list,
                         ref: RecordRef) -> tuple[str, str]:
    """(prompt text, completion text): the prompt rendered with the generation prompt, the
    completion as the rendering of prompt + completion minus the prompt's."""
    try:
        prompt_text = apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = apply_chat_template(prompt + completion, tokenize=False)
    except Exception as err:  # jinja raises its own errors for templates' rules
        raise ref.error("prompt", "not renderable with the chat template",
                        "messages the template accepts", str(err)) from None
    if not full_text.startswith(prompt_text):
        raise ref.error("completion", "not renderable with the chat template",
                        "the prompt rendering to be a prefix of prompt+completion's",
                        full_text[:60])
    return prompt_text, full_text[len(prompt_text):]


def special_ids(tokenizer: Any) -> tuple[int | None, int]:
    """(bos id or None, eos id); a tokenizer without EOS cannot mark where completions end."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token: set eos_token in its "
                          "tokenizer_config.json (completions must end with EOS)")
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def encode_texts(tokenizer: Any, prompts: list[str],
                 completions: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Batch-tokenize, BOS-prefix prompts and EOS-terminate completions (before truncation)."""
    bos, eos = special_ids(tokenizer)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else []
    if bos is not None:
        p_ids = [p if p[:1] == [bos] else [bos, *p] for p in p_ids]
    c_ids = [c if c[-1:] == [eos] else [*c, eos] for c in c_ids]
    return p_ids, c_ids


def check_lengths(prompt_ids: list[int], completion_ids: list[int], ref: RecordRef,
                  opts: TokenizeOptions) -> InputError | None:
    """The reasons a tokenized row is not usable, as the error to raise or count."""
    if not prompt_ids:
        return ref.error("prompt", "empty prompt", "a prompt of at least one token (or a "
                         "tokenizer with a BOS token)", "")
    if not completion_ids:
        return InputError(ref.path, ref.index, "completion", "prompt longer than max_length",
                         f"a prompt of fewer than {opts.max_length} tokens after truncation to "
                         f"--max-prompt-length {opts.max_prompt_length}",
                         f"{len(prompt_ids)} prompt tokens")
    return None


def identical_after_truncation(rows: list[TokenizedRow], refs: dict[int, RecordRef],
                               opts: TokenizeOptions) -> dict[int, InputError]:
    """Pairs whose chosen and rejected differ only past --max-length: after truncation both
    rows hold the same completion, a degenerate pair (as chosen == rejected)."""
    sides: dict[int, dict[bool, list[int]]] = {}
    for r in rows:
        if r.id.split("-")[1] in ("c", "r"):
            sides.setdefault(r.source_index, {})[r.label] = r.completion_ids
    return {i: InputError(refs[i].path, refs[i].index, "rejected", "chosen equals rejected",
                          "chosen and rejected that differ within --max-length "
                          f"{opts.max_length}", "identical completions after truncation")
            for i, pair in sides.items() if len(pair) == 2 and pair[True] == pair[False]}
