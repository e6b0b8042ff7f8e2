"""Pieces both command-line tools use: logging set up once, ``--config file.yaml``
(defaults < file < flags), and user errors printed cleanly at the CLI edge."""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import logging.handlers
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import click

from shared.errors import ENVIRONMENT_ERRNOS, Interrupted, KtoError, StorageError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT,
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, TerminalFilter) for f in handler.filters):
            handler.addFilter(TerminalFilter())


class TerminalFilter(logging.Filter):
    """Library noise of a checkpoint save stays off the terminal (the run log file,
    ``RunLog``, keeps it): accelerate's INFO line per file saved and its "Removed
    shared tensor" warning for tied embeddings (expected: the tie is restored on load)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("accelerate") and record.levelno <= logging.INFO:
            return False
        return "Removed shared tensor" not in record.getMessage()


class RunLog:
    """Everything logged during a run, library noise included, in a file of its output
    folder: records are held in memory from ``start()`` until the folder may be written
    (``open(path)``: a refused run must leave nothing there), then appended to the file."""

    def __init__(self) -> None:
        self._buffer: logging.handlers.MemoryHandler | None = None
        self._file: logging.Handler | None = None

    def start(self) -> None:
        self._buffer = logging.handlers.MemoryHandler(capacity=100_000,
                                                      flushLevel=logging.CRITICAL + 1)
        logging.getLogger().addHandler(self._buffer)

    def open(self, path: Path) -> None:
        self._file = logging.FileHandler(path, encoding="utf-8")
        self._file.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        if self._buffer is not None:
            self._buffer.setTarget(self._file)
            self._buffer.flush()
            self._remove("_buffer")
        logging.getLogger().addHandler(self._file)

    def close(self) -> None:
        self._remove("_buffer")
        self._remove("_file")

    def _remove(self, name: str) -> None:
        handler = getattr(self, name)
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
            setattr(self, name, None)


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


def trl_spellings(decls: list[str]) -> list[str]:
    """``--learning-rate`` -> also ``--learning_rate`` (TRL's and transformers' spelling);
    ``--a-b/--no-a-b`` -> also ``--a_b/--no_a_b``."""
    def underscored(opt: str) -> str:
        return "--" + opt[2:].replace("-", "_") if opt.startswith("--") else opt

    extra = []
    for decl in decls:
        parts = decl.split("/", 1)
        spelled = [underscored(p) for p in parts]
        if spelled != parts:
            extra.append("/".join(s if s != p else "" for s, p in zip(spelled, parts,
                                                                      strict=True)))
    return [*decls, *(d for d in extra if d not in decls)]


class TrlOption(click.Option):
    """An option that also answers to TRL's underscore spelling and to ``aliases`` (TRL's
    own names, e.g. --model_name_or_path); --help shows the dashed names only."""

    def __init__(self, param_decls: list[str], aliases: tuple[str, ...] = (), **attrs: Any):
        super().__init__(trl_spellings([*param_decls, *aliases]), **attrs)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts, secondary = self.opts, self.secondary_opts
        self.opts = [o for o in opts if "_" not in o] or opts
        self.secondary_opts = [o for o in secondary if "_" not in o]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = opts, secondary


def option_keys(command: click.Command) -> dict[str, str]:
    """Every spelling a --config file may use for an option (dashes or underscores, and
    aliases) -> the parameter's name."""
    keys = {}
    for param in command.params:
        for opt in (*param.opts, *getattr(param, "secondary_opts", ())):
            if opt.startswith("--") and param.name:
                keys[opt[2:].replace("-", "_")] = param.name
    return keys


def load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None,
                     other: Callable[[], tuple[str, click.Command]]) -> None:
    """Eager callback: YAML keys become defaults for the options that follow, so flags
    given on the command line still win. One file may serve both commands: keys of the
    other command (``other()``: its name and command) are ignored and named in the log
    (``report_config_file``); a key neither knows is an error."""
    if not value:
        return
    data = _read_yaml(value)
    mine = option_keys(ctx.command)
    other_name, other_command = other()
    theirs = option_keys(other_command)
    values, ignored, unknown = {}, [], []
    for key, item in data.items():
        norm = str(key).replace("-", "_")
        if norm in mine:
            param = next(p for p in ctx.command.params if p.name == mine[norm])
            multiple = getattr(param, "multiple", False)
            values[mine[norm]] = [item] if multiple and isinstance(item, str) else item
        elif norm in theirs:
            ignored.append(str(key))
        else:
            unknown.append(str(key))
    if unknown:
        raise click.BadParameter(f"{value}: unknown key(s) {', '.join(unknown)}"
                                 f"{_did_you_mean(unknown, [*mine, *theirs])}; the keys are "
                                 "the options of kto-precompute and kto-train")
    ctx.meta["config_ignored"] = (value, other_name, ignored)
    ctx.default_map = {**(ctx.default_map or {}), **values}


def _read_yaml(value: str) -> dict[Any, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise click.BadParameter(f"cannot read {value}: {err}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value}: expected a mapping of option names to values")
    return data


def _did_you_mean(names: list[str], known: list[str]) -> str:
    hints = [f"{n} -> {m[0]}" for n in names
             if (m := difflib.get_close_matches(n.replace("-", "_"), known, n=1))]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def report_config_file() -> None:
    """One log line naming the --config keys this command ignored (the other's)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.meta.get("config_ignored") if ctx else None
    if found and found[2]:
        path, other_name, ignored = found
        logging.getLogger(__name__).info("%s: ignoring %s (%s's keys)", path,
                                         ", ".join(ignored), other_name)


def _config_attrs(other: Callable[[], tuple[str, click.Command]]) -> dict[str, Any]:
    return {"type": click.Path(exists=True, dir_okay=False),
            "callback": functools.partial(load_config_file, other=other), "is_eager": True,
            "expose_value": False,
            "help": "YAML file of option values (flags given here win). One file may serve "
                    "kto-precompute and kto-train: each takes its own keys (TRL's spellings "
                    "too) and logs the ones it ignores."}


def config_option(other: Callable[[], tuple[str, click.Command]]) -> Callable:
    """Decorator form of --config, for commands written as functions."""
    return click.option("--config", **_config_attrs(other))


def config_param(other: Callable[[], tuple[str, click.Command]]) -> click.Option:
    """--config for commands built from a list of parameters."""
    return click.Option(["--config"], **_config_attrs(other))


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
