"""The one typed, frozen configuration of kto-train, with TRL's names and defaults (where
one differs from TRL 1.16's KTOConfig, ``TRL_DEFAULTS`` says so and why).
Defaults live here; validation lives here; the CLI only fills it in."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from shared.errors import ConfigError, check_finite, check_seed
from train.loss import LOSS_TYPES, KTOLossConfig

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
              "polynomial", "inverse_sqrt")
REPORT_TO = ("none", "tensorboard", "wandb")
# transformers' names; its default for torch >= 2.8 is the fused kernel (CPU and CUDA)
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")
# The dtype the policy's weights (and so gradients and AdamW state) are loaded in
TORCH_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    model: str
    cache: str
    output: str
    eval_cache: str | None = None
    tokenizer: str | None = None
    # KTO (TRL KTOConfig names)
    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    ftx_gamma: float = 0.0
    # lengths are fixed when the cache is built; given, it must equal the cache's
    max_length: int | None = None
    # optimisation (transformers TrainingArguments names; TRL 1.16 KTOConfig defaults)
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch_fused"
    # precision and memory (TRL / transformers names). Gradient checkpointing is on by
    # default, as in TRL's KTOConfig: memory is what this tool promises to save, and
    # checkpointing cuts activation memory by about the number of layers for about a
    # third more compute (README, Training: memory and precision).
    torch_dtype: str = "float32"
    bf16: bool | None = None  # None: on where a CUDA device supports bf16 (resolved below)
    gradient_checkpointing: bool = True
    attn_implementation: str | None = None  # None = the model's default (sdpa)
    padding_free: bool | None = None  # None = on for flash/flex attention
    group_by_length: bool = True
    router_aux_loss_coef: float | None = None  # None = the MoE model config's own
    seed: int = 42
    # logging and checkpoints
    logging_steps: int = 10
    save_steps: int = 0
    save_total_limit: int = 0
    eval_steps: int = 0
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False
    eval_only: bool = False
    report_to: str = "none"
    # LoRA (through peft): lora_r > 0 turns it on
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    merge_lora: bool = False
    # vision-language policies (LLaMA-Factory's names and defaults): only the language
    # model trains unless these are switched off
    freeze_vision_tower: bool = True
    freeze_multi_modal_projector: bool = True

    def __post_init__(self) -> None:
        if self.bf16 is None:  # resolved here, so train_config.json records what ran
            object.__setattr__(self, "bf16", cuda_supports_bf16())
        check_finite(self)
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"--loss-type {self.loss_type!r}: expected {', '.join(LOSS_TYPES)}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ConfigError(f"--lr-scheduler-type {self.lr_scheduler_type!r}: expected "
                              f"{', '.join(SCHEDULERS)}")
        if self.torch_dtype not in TORCH_DTYPES:
            raise ConfigError(f"--torch-dtype {self.torch_dtype!r}: expected "
                              f"{', '.join(TORCH_DTYPES)}")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"--optim {self.optim!r}: expected {', '.join(OPTIMIZERS)}")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"--report-to {self.report_to!r}: expected {', '.join(REPORT_TO)}")
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps",
                    "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.beta <= 0 or self.learning_rate < 0 or not 0 <= self.warmup_ratio <= 1:
            raise ConfigError("--beta must be > 0, --learning-rate >= 0, --warmup-ratio in [0, 1]")
        check_seed(self.seed)
        _check_run_options(self)
        if self.eval_only and not self.eval_cache:
            raise ConfigError("--eval-only needs --eval-cache")
        if self.eval_steps and not self.eval_cache:  # as transformers' Trainer refuses it
            raise ConfigError(f"--eval-steps {self.eval_steps} needs --eval-cache (a "
                              "kto-precompute cache of held-out rows), or drop --eval-steps")
        if self.max_steps < 1 and self.num_train_epochs <= 0:
            raise ConfigError("set --num-train-epochs > 0 or --max-steps >= 1")

    @property
    def loss(self) -> KTOLossConfig:
        return KTOLossConfig(self.beta, self.loss_type, self.desirable_weight,
                             self.undesirable_weight, self.ftx_gamma)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# Where our default differs from TRL 1.16's KTOConfig: TRL's value and the reason. The
# others (learning rate 1e-6, batch 8, 3 epochs, gradient checkpointing, logging every
# 10 steps) are TRL's.
TRL_DEFAULTS = {
    "bf16": ("on", "on CPU, bf16 autocast is emulated (slower than float32) on CPUs "
                   "without AVX512-BF16/AMX, and results would differ from machine to machine"),
    "save_steps": ("500", "a checkpoint holds the weights and AdamW state (about 16 bytes "
                          "per parameter in float32; 112 GB for a 7B policy), kept forever "
                          "with --save-total-limit 0; a stop signal (preemption, Ctrl-C) "
                          "saves one anyway"),
}


def cuda_supports_bf16() -> bool:
    """TRL turns bf16 autocast on by default; here only where a CUDA device has bf16."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _check_run_options(c: TrainConfig) -> None:
    """Counts and weights that would otherwise fail deep inside a run."""
    if c.max_length is not None and c.max_length < 1:
        raise ConfigError(f"--max-length {c.max_length} must be at least 1")
    for name in ("save_steps", "save_total_limit", "eval_steps", "lora_r"):
        if getattr(c, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
    if c.desirable_weight < 0 or c.undesirable_weight < 0 or not (
            c.desirable_weight or c.undesirable_weight):
        raise ConfigError("--desirable-weight and --undesirable-weight must be >= 0 and not "
                          "both 0")
    if not 0 <= c.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout {c.lora_dropout}: expected a value in [0, 1)")
    if c.router_aux_loss_coef is not None and c.router_aux_loss_coef < 0:
        raise ConfigError(f"--router-aux-loss-coef {c.router_aux_loss_coef} must be >= 0")
    if c.ftx_gamma < 0:
        raise ConfigError(f"--ftx-gamma {c.ftx_gamma} must be >= 0")
    if c.max_grad_norm < 0 or c.weight_decay < 0:
        raise ConfigError("--max-grad-norm and --weight-decay must be >= 0")
    if c.overwrite_output_dir and c.resume_from_checkpoint == "latest":
        raise ConfigError("--overwrite-output-dir and --resume-from-checkpoint latest "
                          "contradict each other: the first removes the checkpoints the second "
                          "resumes from; pass one of them")
