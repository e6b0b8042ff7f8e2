"""Images of vision-language rows: read once from whatever the data hands us (a path,
bytes, a ``datasets`` Image value, a PIL image), checked to decode, and kept as their
encoded bytes with a SHA-256. The cache stores those bytes, so a row's images travel
with it; both stages decode them with ``decode`` (RGB, as every processor expects).

A path is an input like the data file itself: relative paths resolve against the data
file's folder (LLaMA-Factory's ``mllm_demo.json`` layout). A missing, unreadable or
undecodable image is an invalid record (``InputError``), never a traceback."""

from __future__ import annotations

import hashlib
import io
import logging
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import InputError
from shared.formats import RecordRef

log = logging.getLogger(__name__)
IMAGE_FORMS = ("a path (relative to the data file's folder), bytes, a datasets Image value "
               "({'bytes', 'path'}) or a PIL image")
MAX_IMAGE_BYTES = 64 * 2**20  # one image file; larger is refused as an invalid record


@dataclass(frozen=True)
class StoredImage:
    """An image as the cache holds it: its encoded bytes and their SHA-256."""

    data: bytes
    sha256: str


def from_bytes(data: bytes) -> StoredImage:
    return StoredImage(data, hashlib.sha256(data).hexdigest())


def load_image(value: Any, base: Path | None, ref: RecordRef, field: str) -> StoredImage:
    """One image value of a record as stored bytes, checked to decode."""
    data = _image_bytes(value, base, ref, field)
    check_decodes(data, ref, field, f"{value}: " if isinstance(value, str) else "")
    return from_bytes(data)


def _image_bytes(value: Any, base: Path | None, ref: RecordRef, field: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return _read_path(value, base, ref, field)
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return _image_bytes(value["bytes"], base, ref, field)
        if value.get("path"):
            return _read_path(value["path"], base, ref, field)
    if _is_pil(value):
        return _encode_pil(value)
    raise ref.error(field, "not an image", IMAGE_FORMS, value)


def _read_path(text: str, base: Path | None, ref: RecordRef, field: str) -> bytes:
    path = Path(text).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise _error(ref, field, "image not readable", "a regular image file",
                         f"{path} (not a regular file)")
        size = info.st_size
        if size > MAX_IMAGE_BYTES:
            raise _error(ref, field, "image file too large",
                         f"at most {MAX_IMAGE_BYTES >> 20} MiB", f"{path} ({size >> 20} MiB)")
        return path.read_bytes()
    except FileNotFoundError:
        raise _error(ref, field, "image not found", "an existing image file (relative paths "
                     "are read from the data file's folder)", str(path)) from None
    except OSError as err:
        raise _error(ref, field, "image not readable", "a readable image file",
                     f"{path} ({err.strerror or err})") from None


def _error(ref: RecordRef, field: str, reason: str, expected: str, seen: str) -> InputError:
    """``ref.error`` with our own description of what was seen (a path, a size, PIL's
    reason) in full: ``ref.error`` cuts a record's value to 60 characters."""
    return InputError(ref.path, ref.index, field, reason, expected, seen)


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(value, Image.Image)


def _encode_pil(image: Any) -> bytes:
    """A decoded image (a saved dataset's) as PNG: lossless, so decode() gives its pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_decodes(data: bytes, ref: RecordRef, field: str, source: str = "") -> None:
    """``source``: where the bytes came from (a path), named in the error."""
    try:
        decode(data)
    except Exception as err:  # PIL raises many kinds for bad files (and bombs)
        raise _error(ref, field, "image not decodable", "an image file PIL can read "
                     "(JPEG, PNG, WebP, ...)", f"{source}{len(data)} bytes "
                     f"({type(err).__name__}: {str(err)[:80]})") from None


def decode(data: bytes):
    """The image as an RGB PIL image, decompression-bomb limits as errors."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
