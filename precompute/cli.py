"""kto-precompute: the command line. Commands only parse, build the config and call
the library; errors a user can cause print as one line, never a traceback."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from precompute.config import BACKENDS, DTYPES, PrecomputeConfig
from shared.cli import (
    DefaultGroup,
    TrlOption,
    config_option,
    report_config_file,
    setup_logging,
    strict_json,
    summary_stdout,
    user_errors,
)
from shared.formats import SHAPES
from shared.signals import SignalGuard
from shared.tokenization import TRUNCATION_MODES, TokenizeOptions

log = logging.getLogger(__name__)
_D = PrecomputeConfig.__dataclass_fields__
_T = TokenizeOptions()


class AutoInt(click.ParamType):
    """A positive integer, or ``auto`` (None: chosen for the device at run time)."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if value is None or value == "auto":
            return None
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither 'auto' nor an integer", param, ctx)
        if number < 1:
            self.fail(f"{number} must be at least 1 (or 'auto')", param, ctx)
        return number


@click.group(cls=DefaultGroup)
def main() -> None:
    """Build, combine and verify KTO reference caches. `run` is the default command."""


def _train_command() -> tuple[str, click.Command]:
    """The other command, whose --config keys this one ignores."""
    from train.cli import main as train_main

    return "kto-train", train_main


def option(*decls: str, **attrs):
    """click.option that also takes TRL's underscore spelling (--max_length, ...)."""
    return click.option(*decls, cls=TrlOption, **attrs)


@main.command("run")
@config_option(_train_command)
@option("--model", required=True, aliases=("--model_name_or_path",),
        help="Reference model: local directory or hub name (the policy's initial weights). "
             "TRL: --model_name_or_path.")
@option("--data", "data", multiple=True, required=True, aliases=("--dataset_name",),
        help="Input .json/.jsonl (or .json.gz/.jsonl.gz), .parquet file, saved datasets "
             "directory, or a Hub dataset id (streamed; with --dataset-config and "
             "--dataset-split). Repeatable. TRL: --dataset_name.")
@option("--dataset-config", default=None,
        help="Hub dataset: its configuration (subset) name. TRL: --dataset_config.")
@option("--dataset-split", default="train", show_default=True,
        aliases=("--dataset_train_split",),
        help="Hub dataset: the split to read. TRL: --dataset_train_split.")
@option("--output", required=True, type=click.Path(file_okay=False), aliases=("--cache",),
        help="Cache directory (shards + manifest.json); kto-train's --cache (so a shared "
             "--config file's cache key sets it).")
@option("--tokenizer", default=None, help="Tokenizer path if not the model's.")
@option("--format", "format_", type=click.Choice(["auto", *SHAPES]), default="auto",
        show_default=True, help="Input shape; auto detects it from the first record.")
@option("--column", "columns", multiple=True, metavar="CANONICAL=SOURCE",
        help="Read a field under another name, e.g. --column label=kto_tag.")
@option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
        help="auto = vLLM when installed and on a GPU, else transformers (hf), which "
             "is the faster one on CPU; server = a running vLLM server (--server-url).")
@option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
        help="Reference dtype. bfloat16 sums drift by nats; see README.")
@option("--max-length", type=int, default=_T.max_length, show_default=True)
@option("--max-prompt-length", type=int, default=None,
        show_default="half of --max-length",
        help="Prompt tokens kept when a row is too long (TRL's rule).")
@option("--truncation-mode", type=click.Choice(TRUNCATION_MODES),
        default=_T.truncation_mode, show_default=True)
@option("--seed", type=int, default=_D["seed"].default, show_default=True,
        help="Seeds the KL partner derangement (and vLLM).")
@option("--shard-size", type=int, default=_D["shard_size"].default, show_default=True,
        help="Rows per shard; KL partners are drawn within a shard.")
@option("--num-workers", type=int, default=1, show_default=True)
@option("--worker-index", type=int, default=0, show_default=True)
@option("--skip-invalid", is_flag=True,
        help="Count invalid records by reason in the manifest instead of stopping.")
@option("--overwrite", is_flag=True, help="Replace a cache made with other settings.")
@option("--batch-tokens", type=AutoInt(), default="auto", show_default=True,
        help="hf backend: padded tokens per forward batch; auto = 4096 on CPU, on a "
             "GPU from its free memory and the model's size.")
@option("--tensor-parallel-size", type=int, default=1, show_default=True)
@option("--gpu-memory-utilization", type=float,
        default=_D["gpu_memory_utilization"].default, show_default=True)
@option("--cpu-kv-cache-gib", type=float, default=_D["cpu_kv_cache_gib"].default,
        show_default=True, help="vLLM on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE).")
@option("--max-num-batched-tokens", type=AutoInt(), default="auto", show_default=True,
        help="vLLM backend: tokens per engine step; auto = vLLM's default for the device.")
@option("--server-url", default=None, metavar="URL",
        help="--backend server: the vLLM OpenAI-compatible server (or load balancer), "
             "e.g. http://host:8000. API key: $KTO_SERVER_API_KEY or $OPENAI_API_KEY.")
@option("--server-model", default=None, show_default="the server's only model",
        help="--backend server: the served model name to score with.")
@option("--max-concurrent-requests", type=click.IntRange(min=1),
        default=_D["max_concurrent_requests"].default, show_default=True,
        help="--backend server: requests in flight at once (per worker).")
@option("--prompts-per-request", type=click.IntRange(min=1),
        default=_D["prompts_per_request"].default, show_default=True,
        help="--backend server: sequences sent in one /v1/completions request.")
@option("--server-timeout", type=float, default=_D["server_timeout"].default,
        show_default=True,
        help="--backend server: seconds one attempt waits for an answer, and seconds a "
             "request is retried (refused connection, timeout, 429, 5xx) after its "
             "first failure before the run stops with an error.")
@option("-v", "--verbose", is_flag=True)
@user_errors
def run_command(max_length: int, max_prompt_length: int | None, truncation_mode: str, data: tuple,
                format_: str, verbose: bool, **options) -> None:
    """Score a dataset under the reference model and write the cache."""
    setup_logging(verbose)
    report_config_file()
    # stdout carries only the JSON summary (pipelines parse it); vLLM logs to stdout at
    # INFO by default: send it to stderr and keep it to warnings unless -v.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    from precompute.run import run

    config = PrecomputeConfig(
        data=tuple(data), format=format_,
        tokenize=TokenizeOptions(max_length, max_prompt_length, truncation_mode), **options)
    with summary_stdout() as stdout, SignalGuard():
        summary = run(config)
    click.echo(strict_json(summary), file=stdout)


@main.command("combine")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--part", "parts", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A worker's output directory (repeatable); default: OUTPUT itself.")
@click.option("--overwrite", is_flag=True,
              help="Replace a finished cache of other settings or data in OUTPUT.")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def combine_command(output: str, parts: tuple[str, ...], overwrite: bool, verbose: bool) -> None:
    """Merge the parts of --num-workers N runs into one cache in OUTPUT."""
    setup_logging(verbose)
    from precompute.combine import combine

    with SignalGuard():
        manifest = combine(Path(output), [Path(p) for p in parts], overwrite)
    click.echo(f"combined {manifest['num_shards']} shards, {manifest['counts']['rows']} rows "
               f"into {output}")


@main.command("verify")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--no-checksums", is_flag=True, help="Skip the SHA-256 of every shard.")
@user_errors
def verify_command(cache: str, no_checksums: bool) -> None:
    """Check a cache (schema, row counts, checksums) and print its summary."""
    from shared.cache import verify_cache
    from shared.summary import describe_cache

    manifest = verify_cache(cache, checksums=not no_checksums)
    click.echo(describe_cache(manifest))
    click.echo("OK: all shards present" + ("" if no_checksums else ", checksums match"))


@main.command("compare")
@click.argument("cache_a", type=click.Path(exists=True, file_okay=False))
@click.argument("cache_b", type=click.Path(exists=True, file_okay=False))
@user_errors
def compare_command(cache_a: str, cache_b: str) -> None:
    """Max/mean/median |difference| of reference values between two caches of the same
    rows (e.g. --dtype bfloat16 vs float32, or vLLM vs hf)."""
    from precompute.compare import compare_caches

    click.echo(strict_json(compare_caches(Path(cache_a), Path(cache_b))))


if __name__ == "__main__":  # python -m precompute.cli; vLLM spawns workers, so guard it
    main()
