"""Input shapes, detected from a record's fields (or forced), turned into KTO
examples: one (prompt, completion, label) per unpaired record, two per pair.

A prompt or completion is either text or a list of ``{"role", "content"}``
messages; ShareGPT's ``{"from", "value"}`` messages are accepted and renamed."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from shared.errors import RECORD_FIX, ConfigError, InputError

Message = dict[str, str]
Content = Union[str, list[Message]]  # noqa: UP007 (py3.10 runtime alias)

SHAPES = ("unpaired", "paired", "implicit_prompt", "messages", "sharegpt_pairs")
CANONICAL_FIELDS = ("prompt", "completion", "label", "chosen", "rejected", "messages",
                    "conversations")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "system": "system"}
# HH-RLHF style text: the prompt ends after the last assistant marker both sides share.
_ASSISTANT_MARKER = "Assistant:"
# Where an image goes in text (LLaMA-Factory's placeholder); TRL's typed content parts
# ({"type": "image"}) become this marker too.
IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class Example:
    """One KTO row before tokenization. ``side``: 'u' unpaired, 'c' chosen, 'r' rejected."""

    source_index: int
    side: str
    label: bool
    prompt: Content
    completion: Content
    images: tuple[Any, ...] = ()  # raw image values of the record (shared.images reads them)


@dataclass(frozen=True)
class RecordRef:
    """Where a record came from, for error messages."""

    path: str
    index: int

    def error(self, field: str, reason: str, expected: str, seen: Any) -> InputError:
        return InputError(self.path, self.index, field, reason, expected, _describe(seen))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


SHAPE_FIELDS = ("prompt/completion/label, prompt/chosen/rejected, chosen/rejected, "
                "messages+label or conversations/chosen/rejected")


def did_you_mean(fields: Iterable[str], known: Iterable[str] = CANONICAL_FIELDS) -> list[str]:
    """``--column completion=completon`` for each field that is a near miss of a known
    name (and not itself known)."""
    known = list(known)
    hints = []
    for name in fields:
        match = difflib.get_close_matches(str(name), known, n=1, cutoff=0.75)
        if match and name not in known:
            hints.append(f"--column {match[0]}={name}")
    return hints


def unknown_format_fix(keys: Iterable[str]) -> str:
    """What to do when a record's fields match no shape. Not --skip-invalid: when no record
    has a known format, skipping them all leaves nothing to train on."""
    hints = did_you_mean(keys)
    mean = f"Did you mean {' and '.join(hints)}? " if hints else ""
    return (f"{mean}Rename the fields with --column CANONICAL=SOURCE (CANONICAL one of "
            f"{', '.join(CANONICAL_FIELDS)}), or force --format.")


def parse_column_map(items: tuple[str, ...]) -> dict[str, str]:
    """``("label=kto_tag", ...)`` -> ``{"label": "kto_tag"}`` (canonical name -> source name)."""
    mapping: dict[str, str] = {}
    for item in items:
        canonical, sep, source = item.partition("=")
        if not sep or canonical not in CANONICAL_FIELDS or not source:
            near = difflib.get_close_matches(canonical, CANONICAL_FIELDS, n=1)
            mean = f" (did you mean {near[0]}={source}?)" if near and sep else ""
            raise ConfigError(
                f"--column {item!r}: expected CANONICAL=SOURCE with CANONICAL one of "
                f"{', '.join(CANONICAL_FIELDS)}, e.g. --column label=kto_tag{mean}")
        mapping[canonical] = source
    return mapping


def apply_column_map(record: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    out = dict(record)
    for canonical, source in mapping.items():
        if source in out:
            out[canonical] = out.pop(source)
    return out


def detect_shape(record: Any, ref: RecordRef) -> str:
    """Pick the input shape from the fields of the first record."""
    if not isinstance(record, Mapping):
        raise ref.error("<record>", "wrong type", "a JSON object", record)
    keys = set(record)
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt_pairs"
    if ("messages" in keys or "conversations" in keys) and "label" in keys:
        return "messages"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "paired"
    if {"chosen", "rejected"} <= keys:
        return "implicit_prompt"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    raise InputError(ref.path, ref.index, "<record>", "cannot detect the input format",
                     SHAPE_FIELDS, _describe(sorted(keys)), fix=unknown_format_fix(keys))


def to_examples(record: Any, shape: str, ref: RecordRef, source_index: int) -> list[Example]:
    """Validate one record of a known shape and return its KTO examples; a record's
    ``images`` (or ``image``) go with every example made from it."""
    examples = _shape_examples(record, shape, ref, source_index)
    images = tuple(record_images(record, ref))
    return [dataclasses.replace(e, images=images) for e in examples] if images else examples


def _shape_examples(record: Any, shape: str, ref: RecordRef,
                    source_index: int) -> list[Example]:
    if not isinstance(record, Mapping):
        raise ref.error("<record>", "wrong type", "a JSON object", record)
    if shape == "unpaired":
        prompt = _content(record, "prompt", ref, allow_empty=True)
        completion = _content(record, "completion", ref)
        return [Example(source_index, "u", _label(record, ref), prompt, completion)]
    if shape == "messages":
        key = "messages" if "messages" in record else "conversations"
        msgs = _messages(_field(record, key, ref), key, ref)
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise ref.error(key, "malformed conversation",
                            "at least one prompt message followed by a final assistant message",
                            [m["role"] for m in msgs])
        _require_text(msgs[-1:], f"{key}[{len(msgs) - 1}].content", ref)
        return [Example(source_index, "u", _label(record, ref), msgs[:-1], msgs[-1:])]
    if shape == "paired":
        prompt = _content(record, "prompt", ref, allow_empty=True)
        return _pair(source_index, prompt, _content(record, "chosen", ref),
                     _content(record, "rejected", ref), ref)
    if shape == "implicit_prompt":
        prompt, chosen, rejected = _split_shared_prompt(
            _content(record, "chosen", ref), _content(record, "rejected", ref), ref)
        return _pair(source_index, prompt, chosen, rejected, ref)
    if shape == "sharegpt_pairs":
        prompt = _messages(_field(record, "conversations", ref), "conversations", ref)
        if not prompt:
            raise ref.error("conversations", "empty conversation", "at least one message", [])
        chosen = _messages([_field(record, "chosen", ref)], "chosen", ref)
        rejected = _messages([_field(record, "rejected", ref)], "rejected", ref)
        return _pair(source_index, prompt, chosen, rejected, ref)
    raise ConfigError(f"unknown --format {shape!r}: expected auto or one of {', '.join(SHAPES)}")


def _pair(source_index: int, prompt: Content, chosen: Content, rejected: Content,
          ref: RecordRef) -> list[Example]:
    """A desirable and an undesirable row. Identical completions would push the same text
    up and down at once (a degenerate pair): an invalid record, not two rows."""
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(completion, list):
            _require_text(completion, name, ref)
    if chosen == rejected:
        raise ref.error("rejected", "chosen equals rejected",
                        "a rejected completion that differs from the chosen one", rejected)
    return [Example(source_index, "c", True, prompt, chosen),
            Example(source_index, "r", False, prompt, rejected)]


def _require_text(messages: list[Message], name: str, ref: RecordRef) -> None:
    """A completion of messages with no text is as empty as the empty string: rendered,
    it would be only the chat template's tokens and EOS."""
    if all(m["content"] == "" for m in messages):
        raise ref.error(name, "empty completion", "a completion with text",
                        [m["content"] for m in messages])


def _field(record: Mapping[str, Any], name: str, ref: RecordRef) -> Any:
    if name not in record or record[name] is None:
        near = difflib.get_close_matches(name, [str(k) for k in record], n=1, cutoff=0.75)
        fix = (f"Did you mean --column {name}={near[0]}? {RECORD_FIX}" if near and
               name not in record else None)
        raise InputError(ref.path, ref.index, name, "missing field", f"a value for '{name}'",
                         _describe(sorted(record)), fix=fix)
    return record[name]


# what spreadsheets, pandas and labelling tools write for a binary label
_LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
                "desirable": True, "undesirable": False}
LABEL_FORMS = ("a boolean (true = desirable), 0/1, 0.0/1.0, or one of the words "
               + "/".join(_LABEL_WORDS))


def _label(record: Mapping[str, Any], ref: RecordRef) -> bool:
    value = _field(record, "label", ref)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABEL_WORDS:
        return _LABEL_WORDS[value.strip().lower()]
    raise ref.error("label", "wrong type", LABEL_FORMS, value)


def _content(record: Mapping[str, Any], name: str, ref: RecordRef,
             allow_empty: bool = False) -> Content:
    value = _field(record, name, ref)
    if isinstance(value, str):
        _check_unicode(value, name, ref)
        if not value and not allow_empty:
            raise ref.error(name, "empty completion", "non-empty text", value)
        return value
    if isinstance(value, list):
        msgs = _messages(value, name, ref)
        if not msgs and not allow_empty:
            raise ref.error(name, "empty completion", "at least one message", value)
        if not allow_empty:
            _require_text(msgs, name, ref)
        return msgs
    raise ref.error(name, "wrong type", "text or a list of {role, content} messages", value)


def _check_unicode(text: str, name: str, ref: RecordRef) -> None:
    """JSON may carry lone UTF-16 surrogates (an escaped "\\ud800"), which no tokenizer
    can encode: a record defect, named here instead of failing a whole tokenizer batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ref.error(name, "not valid Unicode", "text without lone surrogates",
                        f"{text[err.start]!r} at character {err.start}") from None


def _messages(value: Any, name: str, ref: RecordRef) -> list[Message]:
    if not isinstance(value, list):
        raise ref.error(name, "wrong type", "a list of {role, content} messages", value)
    out = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, Mapping):
            raise ref.error(where, "malformed message", "an object with role and content", msg)
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if isinstance(content, list):
            content = _typed_content(content, f"{where}.content", ref)
        if role not in _ROLES:
            raise ref.error(f"{where}.role", "malformed message",
                            f"one of {', '.join(sorted(_ROLES))}", role)
        if not isinstance(content, str):
            raise ref.error(f"{where}.content", "malformed message", "a string", content)
        _check_unicode(content, f"{where}.content", ref)
        out.append({"role": _ROLES[role], "content": content})
    return out


def _typed_content(parts: list[Any], name: str, ref: RecordRef) -> str:
    """TRL's vision content, ``[{"type": "image"}, {"type": "text", "text": ...}]``, as text
    with an image marker where each image goes."""
    out = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "image" and any(v is not None for k, v in part.items() if k != "type"):
            raise ref.error(f"{name}[{i}]", "an image inside a content part",
                            "{'type': 'image'} parts with the images in the record's 'images' "
                            "(or 'image') field, in placeholder order", part)
        if kind == "image":
            out.append(IMAGE_MARKER)
        elif kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        else:
            raise ref.error(f"{name}[{i}]", "malformed message",
                            "a content part {'type': 'text', 'text': ...} or {'type': 'image'}",
                            part)
    return "".join(out)


def _split_shared_prompt(chosen: Content, rejected: Content,
                         ref: RecordRef) -> tuple[Content, Content, Content]:
    """HH-RLHF style: the prompt is the shared prefix up to the last assistant turn."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = _common_prefix_len(chosen, rejected)
        cut = chosen.rfind(_ASSISTANT_MARKER, 0, k)
        if cut >= 0:
            k = cut + len(_ASSISTANT_MARKER)
        elif k > 0 and chosen[k - 1] == " ":  # keep the space with the completion
            k -= 1
        if k == 0 or k >= min(len(chosen), len(rejected)):
            raise ref.error("chosen", "no shared prompt", "chosen and rejected that share a "
                            "prompt and then differ", chosen[:60])
        return chosen[:k], chosen[k:], rejected[k:]
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = _common_prefix_len(chosen, rejected)
        while k > 0 and not (k < len(chosen) and k < len(rejected)
                             and chosen[k]["role"] == rejected[k]["role"] == "assistant"):
            k -= 1
        if k == 0:
            raise ref.error("chosen", "no shared prompt", "conversations sharing the messages "
                            "before a final assistant turn", [m["role"] for m in chosen])
        return chosen[:k], chosen[k:], rejected[k:]
    raise ref.error("rejected", "wrong type", "the same type as 'chosen' (text or messages)",
                    rejected)


def _common_prefix_len(a: Any, b: Any) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def record_images(record: Mapping[str, Any], ref: RecordRef) -> list[Any]:
    """The raw image values of a record: ``images`` (a list) or ``image`` (one value, TRL's
    single-image shape); none is an empty list."""
    if record.get("images") is not None:
        value = record["images"]
        if not isinstance(value, (list, tuple)):
            raise ref.error("images", "wrong type", "a list of images",
                            value)
        return list(value)
    if record.get("image") is not None:
        return [record["image"]]
    return []
