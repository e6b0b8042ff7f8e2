"""kto-train: the command line. Options are generated from TrainConfig so names and
defaults live in one place; --config file.yaml sets them too (flags win)."""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext

import click

from shared.cli import (
    TrlOption,
    config_param,
    quiet_deepspeed_probe,
    report_config_file,
    setup_logging,
    strict_json,
    summary_stdout,
    user_errors,
)
from shared.signals import SignalGuard
from train.config import (
    OPTIMIZERS,
    REPORT_TO,
    SCHEDULERS,
    TORCH_DTYPES,
    TRL_DEFAULTS,
    TrainConfig,
)
from train.loss import LOSS_TYPES

log = logging.getLogger(__name__)

HELP = {
    "model": "Policy to train (local directory or hub name); also its initial weights. "
             "TRL: --model_name_or_path.",
    "cache": "Reference cache written by kto-precompute (a folder with manifest.json; for a "
             "data file, run kto-precompute on it first).",
    "output": "Directory for metrics.jsonl, checkpoints and the final model. TRL: "
              "--output_dir.",
    "max_length": "Lengths are fixed when the cache is built (kto-precompute --max-length, "
                  "TRL's max_length); given here, it must equal the cache's (checked), so one "
                  "YAML serves both commands.",
    "eval_cache": "A second cache to evaluate on (metrics with an eval_ prefix).",
    "tokenizer": "Tokenizer if not the policy's; must match the cache's fingerprint.",
    "freeze_vision_tower": "Vision-language policies: keep the vision tower's weights fixed "
                           "(LLaMA-Factory's default).",
    "freeze_multi_modal_projector": "Vision-language policies: keep the projector between "
                                    "the vision tower and the language model fixed "
                                    "(LLaMA-Factory's default).",
    "beta": "KTO beta: scale of the implicit reward.",
    "loss_type": "kto, or apo_zero_unpaired (no KL term).",
    "ftx_gamma": "Weight of the SFT term on desirable rows (LLaMA-Factory's pref_ftx).",
    "num_train_epochs": "Epochs (fractions allowed; TRL's default); --max-steps wins when "
                        "> 0.",
    "max_steps": "Optimizer steps; -1 = from --num-train-epochs.",
    "max_grad_norm": "Clip gradients to this norm (0 = no clipping; the norm is logged).",
    "optim": "AdamW kernel: fused (one kernel for all parameters; transformers' default) or "
             "the per-parameter loop (same math).",
    "bf16": "bf16 autocast (weights and optimizer stay in --torch-dtype).",
    "learning_rate": "Peak AdamW learning rate (TRL's default).",
    "per_device_train_batch_size": "Rows per process per micro-batch (TRL's default).",
    "torch_dtype": "dtype the policy is loaded in (its weights, gradients and AdamW state); "
                   "bfloat16 halves their memory, as TRL users load models.",
    "gradient_checkpointing": "Recompute activations in the backward pass (TRL's default): "
                              "much less memory for about a third more compute.",
    "attn_implementation": "transformers attention: sdpa (default), eager, flash_attention_2, "
                           "flex_attention, ...",
    "padding_free": "Pack each micro-batch's sequences into one row (no padding); default: on "
                    "with flash_attention_2/3 or flex_attention, else padded.",
    "router_aux_loss_coef": "MoE models: weight of the router load-balancing loss; default: "
                            "the model config's (0 turns it off; an error on a dense model).",
    "group_by_length": "Batch rows of similar length together to save padding.",
    "logging_steps": "Log every N steps (and always step 1, from the initial weights).",
    "save_steps": "Checkpoint every N steps (0 = only the final model).",
    "save_total_limit": "Keep the N newest checkpoints (0 = all).",
    "eval_steps": "Evaluate every N steps (0 = at the end only).",
    "resume_from_checkpoint": "latest (newest in --output) or a checkpoint directory; the "
                              "settings that decide the result must be the run's own.",
    "overwrite_output_dir": "Replace an earlier run's outputs in --output (checkpoints, "
                            "metrics, model); without it such a folder is refused.",
    "lora_r": "LoRA rank; > 0 trains adapters through peft.",
    "lora_target_modules": "all-linear or a comma-separated list of module names.",
    "merge_lora": "Also save the merged model (adapters are always saved).",
    "eval_only": "Only evaluate --model on --eval-cache (metrics.jsonl), no training.",
}
CHOICES = {"loss_type": LOSS_TYPES, "lr_scheduler_type": SCHEDULERS, "report_to": REPORT_TO,
           "optim": OPTIMIZERS, "torch_dtype": TORCH_DTYPES}
# Optional settings whose default (None) means "decided at run time"
NONE_TYPES = {"padding_free": bool, "router_aux_loss_coef": float, "bf16": bool,
              "max_length": int}
SHOWN_DEFAULT = {"bf16": "on with a bf16 CUDA device, else off", "max_length": "the cache's"}
REQUIRED = ("model", "cache", "output")
# TRL's own names for ours (every option also takes its underscore spelling)
ALIASES = {"model": ("--model_name_or_path",), "output": ("--output_dir",)}


def _help(name: str) -> str | None:
    """The option's help; where our default differs from TRL's, TRL's and the reason."""
    text = HELP.get(name)
    if name in TRL_DEFAULTS:
        trl, reason = TRL_DEFAULTS[name]
        text = f"{text or ''} TRL's default: {trl}; ours differs because {reason}.".strip()
    return text


def _option(field: dataclasses.Field) -> click.Option:
    name = "--" + field.name.replace("_", "-")
    kwargs = {"help": _help(field.name), "show_default": SHOWN_DEFAULT.get(field.name, True),
              "aliases": ALIASES.get(field.name, ())}
    if field.name in REQUIRED:
        return TrlOption([name, field.name], required=True, **kwargs)
    default = field.default
    if isinstance(default, bool) or NONE_TYPES.get(field.name) is bool:
        return TrlOption([f"{name}/--no-{name[2:]}", field.name], default=default, **kwargs)
    if field.name in NONE_TYPES:
        return TrlOption([name, field.name], type=NONE_TYPES[field.name], default=None,
                         **kwargs)
    kind = click.Choice(CHOICES[field.name]) if field.name in CHOICES else (
        type(default) if default is not None else str)
    return TrlOption([name, field.name], type=kind, default=default, **kwargs)


def _precompute_command() -> tuple[str, click.Command]:
    """The other command, whose --config keys this one ignores."""
    from precompute.cli import run_command

    return "kto-precompute", run_command


@user_errors
def _run(verbose: bool, **options) -> None:
    setup_logging(verbose)
    report_config_file()
    quiet_deepspeed_probe()
    from train.trainer import Trainer

    config = TrainConfig(**options)
    with summary_stdout() as stdout, SignalGuard() as signals:
        # a signal during setup stops at once, cleaning up
        trainer = Trainer(config, signals=signals, log_file=True)
        try:
            trainer.setup()
            # training: a signal finishes the step and saves a checkpoint; evaluation alone
            # has nothing to save, so a signal stops it at once
            with nullcontext() if config.eval_only else signals.deferred():
                final = trainer.train()
                if not config.eval_only:
                    trainer.save()
        finally:
            trainer.cleanup()
    if trainer.accelerator.is_main_process:
        click.echo(strict_json({"output": str(trainer.out), **final, **trainer.timing}),
                   file=stdout)


main = click.Command(
    "kto-train", callback=_run,
    params=[config_param(_precompute_command),
            *(_option(f) for f in dataclasses.fields(TrainConfig)),
            click.Option(["-v", "--verbose"], is_flag=True)],
    help="Train the policy with KTO from a kto-precompute cache; no reference model is "
         "loaded. Every option also takes TRL's spelling (--learning_rate, --output_dir, "
         "--model_name_or_path, ...). Multi-GPU: accelerate launch \"$(which kto-train)\" ... "
         "(see docs/training.md).")

if __name__ == "__main__":  # python -m train.cli
    main()
