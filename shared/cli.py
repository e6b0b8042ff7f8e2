"""Pieces both command-line tools use: logging set up once, ``--config file.yaml``
(defaults < file < flags), and user errors printed cleanly at the CLI edge."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import click

from shared.errors import ENVIRONMENT_ERRNOS, Interrupted, KtoError, StorageError


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)



def quiet_deepspeed_probe() -> None:
    """deepspeed, when installed (the test extra has it), guesses its device when
    transformers imports it during a save and, on a machine without CUDA, prints a warning
    to stdout: name the device for it there. Only for programs that may touch CUDA (never
    kto-precompute, whose vLLM engine must start first)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextlib.contextmanager
def summary_stdout() -> Iterator[TextIO]:
    """Standard output is for the JSON summary that pipelines parse: while the command
    runs, whatever libraries print there goes to standard error instead (deepspeed, for
    one, logs to stdout on import). Yields the real stdout, for the summary."""
    real = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield real


def load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """Eager callback: YAML keys become defaults for the options that follow, so flags
    given on the command line still win."""
    if not value:
        return
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise click.BadParameter(f"cannot read {value}: {err}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value}: expected a mapping of option names to values")
    known = {p.name for p in ctx.command.params}
    normalized = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalized) - known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown option(s) {unknown}")
    ctx.default_map = {**(ctx.default_map or {}), **normalized}


_CONFIG_ATTRS = {"type": click.Path(exists=True, dir_okay=False), "callback": load_config_file,
                 "is_eager": True, "expose_value": False,
                 "help": "YAML file of option values (flags given here win)."}


def config_option(fn: Callable) -> Callable:
    """Decorator form of --config, for commands written as functions."""
    return click.option("--config", **_CONFIG_ATTRS)(fn)


def config_param() -> click.Option:
    """--config for commands built from a list of parameters."""
    return click.Option(["--config"], **_CONFIG_ATTRS)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's typed errors into one clean message (exit code 1; 128 + the
    signal's number when a signal stopped the command). An OSError of the machine (disk
    full, read-only, no permission) that no library code named is reported the same way."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Interrupted as err:
            raise _exit_with(str(err), err.exit_code) from None
        except KtoError as err:
            raise click.ClickException(str(err)) from None
        except BrokenPipeError:  # stdout closed early (`... | head`): quiet, as a shell tool
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + 13)  # SIGPIPE's status
        except OSError as err:
            if err.errno not in ENVIRONMENT_ERRNOS:
                raise
            raise click.ClickException(str(StorageError(err.filename, err))) from None
        except RuntimeError as err:  # torch.OutOfMemoryError is one; torch stays unimported
            if type(err).__name__ != "OutOfMemoryError":
                raise
            raise click.ClickException(OUT_OF_MEMORY.format(str(err).splitlines()[0])) from None
    return wrapper


OUT_OF_MEMORY = ("out of accelerator memory ({}). kto-precompute: lower --batch-tokens (hf) "
                 "or --gpu-memory-utilization (vLLM); kto-train: lower "
                 "--per-device-train-batch-size (and raise --gradient-accumulation-steps), keep "
                 "--gradient-checkpointing on, or load the policy with --torch-dtype bfloat16")


def _exit_with(message: str, code: int) -> click.ClickException:
    err = click.ClickException(message)
    err.exit_code = code
    return err


def strict_json(value: Any) -> str:
    """A summary for standard output: strict JSON, so non-finite floats (a rate that was
    not measured, a class with no rows) become null instead of NaN."""
    return json.dumps(_finite(value), indent=2, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class DefaultGroup(click.Group):
    """A group whose first command runs when no command name is given, so
    ``kto-precompute --model M ...`` and ``kto-precompute run --model M ...`` agree."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)
