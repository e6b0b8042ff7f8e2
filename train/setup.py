"""Building the pieces of a run: accelerator, tokenizer, policy (dropout off, optional
LoRA), optimizer, scheduler; the class-balance warning; the final save."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from shared.errors import ConfigError
from shared.files import refuse_links
from shared.vision import check_family
from train.checkpoint import remove_entry
from train.config import TrainConfig
from train.head import add_chunked_head
from train.vision import freeze_vision_parts, lora_exclusions

log = logging.getLogger(__name__)
FINAL_STAGING = ".final-save.partial"


def make_accelerator(config: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    log_with = None if config.report_to == "none" else config.report_to
    if log_with and importlib.util.find_spec(log_with) is None:
        raise ConfigError(f"--report-to {log_with}: the {log_with} package is not installed "
                          f"(pip install {log_with})")
    # cpu=True on a machine without CUDA: only then does accelerate treat a torchrun /
    # `accelerate launch --multi_gpu` start as multi-process CPU (gloo); else each process
    # would train alone.
    # gradient accumulation through accelerate (`accumulate` in the loop): it syncs DDP only
    # on the last micro-batch, scales the loss, and tells DeepSpeed where a step ends
    acc = Accelerator(mixed_precision="bf16" if config.bf16 else "no", log_with=log_with,
                      project_dir=str(out), cpu=not torch.cuda.is_available(),
                      gradient_accumulation_steps=config.gradient_accumulation_steps)
    set_seed(config.seed)
    # trackers start, and train_config.json is written, once the run may use --output
    return acc


def configure_deepspeed(accelerator, config: TrainConfig) -> None:
    """DeepSpeed sizes its engine from a DataLoader's batch size, which kto-train does not
    use (it slices the epoch order itself): give it the micro-batch and accumulation, and
    --max-grad-norm (it clips in its own step)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if config.max_grad_norm > 0:  # DeepSpeed clips inside its own step
        ds["gradient_clipping"] = config.max_grad_norm
    ds["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
    ds["gradient_accumulation_steps"] = config.gradient_accumulation_steps
    ds["train_batch_size"] = (config.per_device_train_batch_size
                              * config.gradient_accumulation_steps * accelerator.num_processes)


def load_tokenizer(config: TrainConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(config.tokenizer or config.model)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise ConfigError(f"cannot load a tokenizer from {config.tokenizer or config.model!r}: "
                          f"{err}") from None


def disable_dropout(model: torch.nn.Module) -> None:
    """KTO compares log-probs of the same sequences under two models: dropout noise would
    bias the rewards, so every dropout is off (as TRL's disable_dropout_in_model)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0


def load_policy(config: TrainConfig, vision: bool = False) -> torch.nn.Module:
    """The policy in --torch-dtype, dropout off, the chunked LM head added (train.head),
    gradient checkpointing as asked, LoRA last (the head patch is on the base model).
    ``vision``: a vision-language policy (its image-text-to-text class; the vision tower
    and projector frozen as asked, train.vision)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    extra = ({"attn_implementation": config.attn_implementation}
             if config.attn_implementation else {})
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(config.model, dtype=getattr(torch, config.torch_dtype),
                                     **extra)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"cannot load the policy from {config.model!r}: {err}") from None
    disable_dropout(model)
    if vision:
        check_family(model.config, config.model)
        freeze_vision_parts(model, config.freeze_vision_tower,
                            config.freeze_multi_modal_projector)
    add_chunked_head(model)
    if config.gradient_checkpointing:
        # non-reentrant: works with DDP's no_sync and with frozen inputs (LoRA)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_r > 0:
        model = _with_lora(model, config)
    return model


def router_aux_coef(model: torch.nn.Module, config: TrainConfig) -> float:
    """TRL 1.16's rule: the configured coefficient, else the MoE model config's own
    (``router_aux_loss_coef``, 0 if it declares none); a non-zero coefficient on a model
    without router logits is an error."""
    text = model.config.get_text_config()
    is_moe = hasattr(text, "output_router_logits")
    coef = config.router_aux_loss_coef
    if coef and not is_moe:
        raise ConfigError(f"--router-aux-loss-coef {coef}: {type(model).__name__} is not a "
                          "mixture-of-experts model with router logits, so there is no "
                          "auxiliary loss to weight; drop the flag")
    if not is_moe:
        return 0.0
    return float(getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef)


def _with_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    if importlib.util.find_spec("peft") is None:
        raise ConfigError("--lora-r > 0 needs peft: pip install 'kto-cache[lora]'")
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    skip = lora_exclusions(model) if hasattr(model.config, "vision_config") else []
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else targets.split(","),
                      # a vision-language policy: only the language model gets adapters
                      exclude_modules=(f"(?:{'|'.join(map(re.escape, skip))})\\..*"
                                       if skip else None))
    return get_peft_model(model, lora)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; as transformers' Trainer, no weight decay on biases and norm weights, and by
    default its fused kernel: the per-parameter loop took 8% of a CPU step in a profile
    (see README, Benchmarks against TRL)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate,
                             fused=config.optim == "adamw_torch_fused")


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(config.warmup_ratio * total_steps)
    return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def class_balance_warning(counts: dict[str, Any], config: TrainConfig) -> str | None:
    """The paper's recommended range: lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]."""
    n_d, n_u = counts["desirable"], counts["undesirable"]
    if n_d == 0 or n_u == 0:
        msg = (f"the cache has {n_d} desirable and {n_u} undesirable rows: KTO needs both "
               "(with one class the loss only moves that class relative to z)")
        log.warning(msg)
        return msg
    if not (config.desirable_weight and config.undesirable_weight):
        msg = ("a class weight is 0 (--desirable-weight / --undesirable-weight): that class's "
               "rows do not count in the loss")
        log.warning(msg)
        return msg
    ratio = config.desirable_weight * n_d / (config.undesirable_weight * n_u)
    if 1 <= ratio <= 4 / 3:
        return None
    low, high = config.undesirable_weight * n_u / n_d, 4 / 3 * config.undesirable_weight * n_u / n_d
    msg = (f"desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {ratio:.3f} "
           f"({n_d} desirable, {n_u} undesirable rows) is outside the recommended [1, 4/3]; "
           f"set --desirable-weight between {low:.3f} and {high:.3f}")
    log.warning(msg)
    return msg


def save_final(accelerator, model, tokenizer, config: TrainConfig, out: Path,
               processor=None) -> None:
    """Weights + tokenizer in OUTPUT (LoRA: the adapters, and the merged model if asked).
    Saved into a hidden folder first, then moved into place file by file, none of them
    through a link planted in OUTPUT (a link where a file of the save belongs is refused
    before anything moves)."""
    staging = out / FINAL_STAGING
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_entry(staging)
        staging.mkdir()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if config.lora_r > 0:
        if accelerator.is_main_process:
            unwrapped.save_pretrained(staging / "adapter")
            if config.merge_lora:
                unwrapped.merge_and_unload().save_pretrained(staging)
    else:
        unwrapped.save_pretrained(staging, state_dict=accelerator.get_state_dict(model),
                                  is_main_process=accelerator.is_main_process,
                                  save_function=accelerator.save)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokenizer.save_pretrained(staging)
        if processor is not None:  # a vision-language policy: its image settings too
            processor.save_pretrained(staging)
        move_into_place(staging, out)
    accelerator.wait_for_everyone()


def move_into_place(staging: Path, out: Path) -> None:
    names = sorted(p.name for p in staging.iterdir())
    refuse_links(out, names, "a file of the final save")
    for name in names:
        if (out / name).is_dir():
            remove_entry(out / name)  # an earlier save's adapter folder
        os.replace(staging / name, out / name)
    staging.rmdir()
