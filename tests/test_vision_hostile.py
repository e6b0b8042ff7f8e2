"""Vision-language inputs and caches as a hostile or careless user hands them: image paths
that are not files, images the record hides where nothing reads them, caches edited
consistently (every checksum, digest and cache key recomputed) so that only the content
checks can tell. Each is one clear error, never a hang, a traceback or a silent change."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import build_cache
from tiny_vision import random_image, save_tiny_llava

from shared.errors import InputError
from shared.formats import RecordRef, to_examples

IMAGE_TOKEN_ID = 1024  # the tiny LLaVA's <image>


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-hostile")
    (root / "img").mkdir()
    records = []
    for i in range(8):
        random_image(i, 40 + i, 36).save(root / f"img/{i}.png")
        records.append({"messages": [{"role": "user", "content": "<image>What is this?"},
                                     {"role": "assistant",
                                      "content": ("A lake.", "Two cats.")[i % 2]}],
                        "images": [f"img/{i}.png"], "label": i % 2 == 0})
    (root / "data.json").write_text(json.dumps(records))
    reference = save_tiny_llava(root / "reference", seed=0)
    build_cache(reference, [root / "data.json"], root / "cache", shard_size=4)
    return {"root": root, "reference": reference, "cache": root / "cache",
            "policy": save_tiny_llava(root / "policy", seed=1)}


# ---- image paths ---------------------------------------------------------------------------
class _Hung(Exception):
    pass


def _load_with_deadline(value, base: Path, seconds: int = 10):
    from shared.images import load_image

    def hung(*_):
        raise _Hung(f"load_image({value!r}) still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        return load_image(value, base, RecordRef("data.json", 3), "images[0]")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_an_image_path_that_is_a_fifo_is_refused_not_read(tmp_path):
    """A FIFO (or /dev/stdin) as an image: reading it blocks until someone writes, so
    kto-precompute hung for ever on one record. It is refused as not a regular file."""
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputError, match=r"record 3, field 'images\[0\]': image not readable: "
                       r"expected a regular image file, .*pipe\.png \(not a regular file\)"):
        _load_with_deadline("pipe.png", tmp_path)


def test_an_image_path_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(InputError, match=r"image not readable: .*folder\.png"):
        _load_with_deadline("folder.png", tmp_path)


def test_an_undecodable_image_is_named_with_its_path_and_pil_reason(tmp_path):
    """The error cut what it saw to 60 characters: a long path, or PIL's reason
    ("DecompressionBombError: Image size (900000000 pi..."), lost the part that matters."""
    folder = tmp_path / "a-rather-long-folder-name-as-datasets-have" / "images"
    folder.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(_png_declaring(30000, 30000))
    with pytest.raises(InputError) as err:
        _load_with_deadline(str(folder / "bomb.png"), tmp_path)
    assert "image not decodable" in str(err.value) and str(folder / "bomb.png") in str(err.value)
    assert "DecompressionBombError: Image size (900000000 pixels) exceeds" in str(err.value)
    with pytest.raises(InputError) as err:
        _load_with_deadline(str(folder / "missing.png"), tmp_path)
    assert f"image not found: expected an existing image file (relative paths are read from " \
           f"the data file's folder), got {folder / 'missing.png'}." in str(err.value)


# ---- images inside content parts -------------------------------------------------------------
def test_an_image_inside_a_content_part_is_not_silently_replaced():
    """TRL's processed messages put the image in the part: {"type": "image", "image": ...}.
    A record whose part names one image and whose ``images`` field another must not train
    on the field's image as if the part had said nothing."""
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "b.png"},
                                                        {"type": "text", "text": "Hi"}]},
                           {"role": "assistant", "content": "Hello."}],
              "images": ["a.png"], "label": True}
    with pytest.raises(InputError, match=r"record 0, field 'messages\[0\]\.content\[0\]': an "
                       "image inside a content part"):
        to_examples(record, "messages", RecordRef("data.json", 0), 0)


# ---- consistently edited caches -----------------------------------------------------------
def _png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header declares width x height (a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 4000)) + chunk(b"IEND", b""))


def rewrite_consistently(cache: Path, edit_rows=None, edit_manifest=None) -> None:
    """Shard 0's rows edited, then everything recomputed as a careful forger would: the
    images digest, the cache key, every shard (its footer's key) and every checksum."""
    from shared.cache import write_shard
    from shared.manifest import cache_key_of
    from shared.vision import images_digest

    manifest = json.loads((cache / "manifest.json").read_text())
    names = [e["name"] for e in manifest["shards"]]
    tables = {n: pq.read_table(cache / n).to_pylist() for n in names}
    if edit_rows:
        edit_rows(tables[names[0]])
    if edit_manifest:
        edit_manifest(manifest)
    if "images_sha256" in manifest["data"]:
        manifest["data"]["images_sha256"] = images_digest(
            [r["image_sha256"] for n in names for r in tables[n]])
    manifest["cache_key"] = cache_key_of(manifest)
    for entry in manifest["shards"]:
        info = write_shard(cache, entry["name"], pa.Table.from_pylist(tables[entry["name"]]),
                           manifest["cache_key"])
        entry.update(sha256=info.sha256, tokens=info.tokens, rows=info.rows)
    manifest["tokens"] = sum(e["tokens"] for e in manifest["shards"])
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _verify(cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "precompute.cli", "verify", str(cache)],
                          capture_output=True, text=True, timeout=300)


def _train(policy: Path, cache: Path, output: Path):
    from train.cli import main

    return CliRunner().invoke(main, ["--model", str(policy), "--cache", str(cache),
                                     "--output", str(output), "--max-steps", "2",
                                     "--per-device-train-batch-size", "4", "--no-bf16"])


def test_verify_refuses_vision_shards_under_a_manifest_without_processor(vlm, tmp_path):
    """The manifest's processor section (and the images digest) removed, the key rehashed:
    verify passed, and kto-train read the rows as a text cache (image token ids with no
    pixels)."""
    cache = tmp_path / "cache"
    shutil.copytree(vlm["cache"], cache)

    def drop_processor(manifest):
        del manifest["processor"], manifest["data"]["images_sha256"]

    rewrite_consistently(cache, edit_manifest=drop_processor)
    result = _verify(cache)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "holds images, but the manifest records no image processor" in result.stderr


@pytest.mark.parametrize("data,reason", [
    (b"these bytes are no image", "UnidentifiedImageError"),
    (_png_declaring(30000, 30000), "DecompressionBombError"),
], ids=["not an image", "png bomb"])
def test_training_names_a_cached_image_it_cannot_decode(vlm, tmp_path, data, reason):
    """An image's bytes replaced (its hash and the digest matching): verify hashes images
    without decoding them, so kto-train is where it shows; it ended in PIL's traceback."""
    cache = tmp_path / "cache"
    shutil.copytree(vlm["cache"], cache)

    def replace(rows):
        rows[0]["images"][0]["bytes"] = data
        rows[0]["image_sha256"][0] = hashlib.sha256(data).hexdigest()

    rewrite_consistently(cache, replace)
    result = _train(vlm["policy"], cache, tmp_path / "out")
    assert result.exit_code == 1 and result.exc_info[0] is SystemExit, result.exc_info
    assert "Error: the cache holds an image that cannot be decoded" in result.output
    assert hashlib.sha256(data).hexdigest()[:16] in result.output and reason in result.output


def test_a_row_whose_image_lost_a_token_is_named(vlm, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(vlm["cache"], cache)

    def drop_one(rows):
        rows[0]["prompt_ids"].remove(IMAGE_TOKEN_ID)
        rows[0]["image_tokens"][0] -= 1

    rewrite_consistently(cache, drop_one)
    verified = _verify(cache)
    if verified.returncode == 1:  # refused by verify, naming the row: a fix too
        assert "Traceback" not in verified.stderr and "row 0" in verified.stderr
        return
    result = _train(vlm["policy"], cache, tmp_path / "out")
    assert result.exit_code == 1 and result.exc_info[0] is SystemExit, result.exc_info
    assert "Error:" in result.output and "Traceback" not in result.output
    assert "image 0: the cache records 15 tokens for it, the policy's processor expands it to 16" \
        in result.output


# ---- a model and a processor that do not belong together ---------------------------------------
def _one_record_pair(folder: Path) -> Path:
    random_image(0).save(folder / "a.png")
    records = [{"prompt": "<image>Hi", "completion": c, "images": ["a.png"], "label": lab}
               for c, lab in (("Hello.", True), ("Go away.", False))]
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_a_text_model_with_a_vision_tokenizer_folder_is_refused(vlm, tiny_dir, tmp_path):
    """--model TEXT --tokenizer VLM: the processor made it a vision run, and the scorer's
    AutoModelForImageTextToText ended in transformers' traceback."""
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match=r"has an image processor, but --model .* is a text "
                       r"model \(llama, no vision tower\)"):
        build_cache(tiny_dir, [_one_record_pair(tmp_path)], tmp_path / "cache",
                    tokenizer=str(vlm["reference"]))


def test_a_vision_model_without_its_processor_is_refused(vlm, tiny_dir, tmp_path):
    """--model VLM with a tokenizer folder that holds no processor (a checkpoint saved
    without its processor files): it was scored as a text model, AutoModelForCausalLM's
    traceback."""
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match=r"is a vision-language model \(llava\), but .* has "
                       r"no image processor"):
        build_cache(vlm["reference"], [_one_record_pair(tmp_path)], tmp_path / "cache",
                    tokenizer=str(tiny_dir))


def test_a_processor_that_does_not_fit_its_model_is_named(tmp_path):
    """A processor whose resolution is not its vision tower's (48 px images for a 32 px CLIP):
    the scorer's probe names it before any shard."""
    from shared.errors import ConfigError

    model = save_tiny_llava(tmp_path / "mismatched", seed=0, image_size=48)  # 32 px tower
    with pytest.raises(ConfigError, match="the processor's images do not fit the model"):
        build_cache(model, [_one_record_pair(tmp_path)], tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("shard-*"))
