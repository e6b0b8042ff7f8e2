"""The policy-only KTO training loop on accelerate. Reads as steps: build batch,
forward, loss, step, log, checkpoint. No reference model is loaded: reference
log-probs come from the cache (or from ``reference``, a hook the tests use to
compare against a live reference model)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from shared.cli import RunLog
from shared.errors import ConfigError, Interrupted, KtoError, writing
from shared.files import refuse_links_in
from shared.signals import SignalGuard
from shared.sources import check_model_source
from shared.weights import check_weight_files
from train.checkpoint import Checkpointer
from train.config import TrainConfig
from train.data import (
    CacheRows,
    check_cache_folder,
    check_eval_pairing,
    check_max_length,
    check_token_ids,
    collate,
    epoch_order,
    micro_batch_rows,
    open_cache,
)
from train.guard import NonFiniteLossError, any_process, check_grad_norm, check_rows
from train.head import policy_logps
from train.loss import KTOLossOutput, estimate_kl, kto_loss
from train.metrics import MetricsFile, MetricWindow
from train.packing import use_packing
from train.run_folder import lock_output, plan_run, run_identity, start_run
from train.setup import (
    build_optimizer,
    build_scheduler,
    class_balance_warning,
    configure_deepspeed,
    load_policy,
    load_tokenizer,
    make_accelerator,
    router_aux_coef,
    save_final,
)
from train.trackers import start_trackers, tracker_values
from train.vision import ImageBatcher, is_vision_cache, policy_processor

log = logging.getLogger(__name__)
Reference = Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
__all__ = ["NonFiniteLossError", "Trainer", "cached_reference"]
LOG_FILE = "kto-train.log"


def cached_reference(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["ref_logps"], batch["ref_kl_logps"]


def with_aux_loss(out: KTOLossOutput, aux: torch.Tensor, coef: float) -> KTOLossOutput:
    """TRL's MoE objective: the KTO loss + router_aux_loss_coef x load-balancing loss."""
    return dataclasses.replace(out, loss=out.loss + coef * aux.to(out.loss.dtype),
                               aux_loss=aux.detach())


def eval_span_check(rows: int, per_device: int, world: int) -> None:
    """Evaluation gathers equal batches from every process, so with several processes it
    reads a multiple of per_device x processes rows: refuse an eval cache smaller than
    that, and say how many rows a larger one leaves out."""
    span = per_device * world
    if world > 1 and rows < span:
        raise KtoError(f"--eval-cache holds {rows} rows, fewer than one evaluation batch over "
                       f"all processes ({per_device} x {world}); lower "
                       "--per-device-train-batch-size or use a larger eval cache")
    if world > 1 and rows % span:
        log.warning("evaluating %d of the eval cache's %d rows (a multiple of %d x %d "
                    "processes)", rows - rows % span, rows, per_device, world)


def check_sources(c: TrainConfig) -> None:
    """The paths a run reads, named at once when wrong (no hub retries, no model load)."""
    check_model_source(c.model)
    if c.tokenizer:
        check_model_source(c.tokenizer, "--tokenizer")
    check_cache_folder(c.cache, c.model)
    if c.eval_cache:
        check_cache_folder(c.eval_cache, c.model, "--eval-cache")


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    def __init__(self, config: TrainConfig, reference: Reference = cached_reference,
                 signals: SignalGuard | None = None, log_file: bool = False):
        self.config = config
        # the CLI's: everything logged also goes to OUTPUT/kto-train.log once the run may
        # write there (library noise of checkpoint saves goes only there)
        self.run_log = RunLog() if log_file else None
        self.reference = reference
        # installed by the CLI: a stop signal ends the loop at a step boundary (checkpoint)
        self.signals = signals or SignalGuard()
        self.timing: dict[str, float] = {}  # steps_run, train_seconds (filled by train)
        self.out = Path(config.output)

    @staticmethod
    def accelerator_is_main() -> bool:
        """Rank 0 before the accelerator exists (the launchers' environment)."""
        return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"

    # ---- setup -----------------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        if self.run_log and self.accelerator_is_main():
            self.run_log.start()
        check_sources(c)  # before anything loads or --output is created
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--output {self.out} is a file, not a folder; choose a folder "
                              "(it is created if missing)")
        self._created = not self.out.exists()  # removed by cleanup if a refusal left it empty
        with writing(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
        refuse_links_in(self.out, "this run")
        self.accelerator = make_accelerator(c, self.out)
        self._lock = lock_output(self.accelerator, self.out)  # one run at a time in --output
        self.tokenizer = load_tokenizer(c)
        # the caches' rows are copied into $TMPDIR and memory-mapped; the files go when
        # setup is done (POSIX keeps an unlinked file's pages while a mapping holds them), so
        # a kill -9 during training leaves nothing behind
        with tempfile.TemporaryDirectory(prefix="kto-train-", ignore_cleanup_errors=True) as tmp:
            name = c.tokenizer or c.model
            self.rows = open_cache(c.cache, self.tokenizer, Path(tmp) / "train.arrow", name)
            self.eval_rows = (open_cache(c.eval_cache, self.tokenizer, Path(tmp) / "eval.arrow",
                                         name) if c.eval_cache else None)
        for rows, where in ((self.rows, c.cache), (self.eval_rows, c.eval_cache)):
            if rows is not None:
                check_max_length(c.max_length, rows.manifest, where)
        if self.eval_rows is not None:
            check_eval_pairing(self.rows.manifest, self.eval_rows.manifest)
        self.vision = is_vision_cache(self.rows.manifest)
        # a vision-language cache: the policy's processor must be the cache's
        self.processor = (policy_processor(self.rows.manifest, c.tokenizer or c.model, c.cache)
                          if self.vision else None)
        self.images = (ImageBatcher(self.processor, getattr(torch, c.torch_dtype))
                       if self.vision else None)
        if self.accelerator.is_main_process:
            class_balance_warning(self.rows.manifest["counts"], c)
        world = self.accelerator.num_processes
        if self.eval_rows is not None:
            eval_span_check(len(self.eval_rows), c.per_device_train_batch_size, world)
        self.global_batch = c.per_device_train_batch_size * c.gradient_accumulation_steps * world
        self.steps_per_epoch = len(self.rows) // self.global_batch
        if self.steps_per_epoch == 0:
            raise KtoError(f"the cache holds {len(self.rows)} rows, fewer than one global batch "
                           f"({self.global_batch}); lower the batch size")
        self.total_steps = (c.max_steps if c.max_steps > 0
                            else math.ceil(c.num_train_epochs * self.steps_per_epoch))
        identity = run_identity(c, self.rows.manifest,
                                self.eval_rows.manifest if self.eval_rows else None, world)
        plan = plan_run(self.out, c, identity)  # before anything in --output changes
        check_weight_files(c.model)
        model = load_policy(c, vision=self.vision)
        vocab = model.get_input_embeddings().num_embeddings
        check_token_ids(self.rows, vocab, f"--cache {c.cache}")
        if self.eval_rows is not None:
            check_token_ids(self.eval_rows, vocab, f"--eval-cache {c.eval_cache}")
        self.pack = use_packing(c.padding_free, model.config._attn_implementation)
        self.aux_coef = router_aux_coef(model, c)
        log.info("policy: %s weights, %s attention, %s batches, gradient checkpointing %s%s",
                 c.torch_dtype, model.config._attn_implementation,
                 "packed" if self.pack else "padded", "on" if c.gradient_checkpointing else "off",
                 f", router aux loss x {self.aux_coef}" if self.aux_coef else "")
        configure_deepspeed(self.accelerator, c)
        optimizer = build_optimizer(model, c)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # on the prepared optimizer: DeepSpeed regroups the parameters it partitions
        self.scheduler = build_scheduler(self.optimizer, c, self.total_steps)
        # the scheduler's state goes into the checkpoint's JSON (train.checkpoint), not
        # through register_for_checkpointing, whose file accelerate unpickles in full
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.checkpoints = Checkpointer(self.accelerator, self.out, c.save_total_limit, identity,
                                        self.scheduler)
        # loaded (and so checked) before anything in --output changes: a refused checkpoint
        # leaves the folder as it was
        self.step = (self.checkpoints.load(plan.resume_from, self.total_steps)
                     if plan.resume_from else 0)
        start_run(self.accelerator, self.out, c, plan)
        if self.run_log and self.accelerator.is_main_process:
            self.run_log.open(self.out / LOG_FILE)
        start_trackers(self.accelerator, c, self.out)  # only now may --output change
        # only the main process touches metrics.jsonl (another would truncate it)
        self.metrics = (MetricsFile(self.out / "metrics.jsonl",
                                    self.step if plan.resume_from else None)
                        if self.accelerator.is_main_process else None)
        self._orders: dict[int, Any] = {}

    # ---- one micro-step ------------------------------------------------------------
    def _order(self, epoch: int):
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.rows.lengths, epoch, self.config.seed,
                                               self.global_batch, self.config.group_by_length)}
        return self._orders[epoch]

    def _batch(self, rows: CacheRows, indices) -> dict[str, Any]:
        return _to(collate(rows, indices, self.pad_id, self.pack, self.images),
                   self.accelerator.device)

    def forward_loss(self, batch: dict[str, Any]) -> tuple[KTOLossOutput, torch.Tensor, int]:
        c, acc = self.config, self.accelerator
        ref_logps, ref_kl_logps = self.reference(batch)
        with acc.autocast():
            target = policy_logps(self.model, {**batch["target"],
                                               "output_router_logits": bool(self.aux_coef)})
            if c.loss_type == "kto":
                with torch.no_grad():
                    kl_logps = policy_logps(self.model, batch["kl"]).logps
                kl = estimate_kl(kl_logps, ref_kl_logps, acc.gather)
            else:
                kl = torch.zeros((), dtype=torch.float64, device=acc.device)
            out = kto_loss(target.logps, ref_logps, batch["labels"], kl, c.loss,
                           batch["completion_lengths"])
            if target.aux_loss is not None:
                out = with_aux_loss(out, target.aux_loss, self.aux_coef)
        tokens = sum(int(batch[k]["score_mask"].numel() if self.pack else
                         batch[k]["attention_mask"].sum())
                     for k in (("target", "kl") if c.loss_type == "kto" else ("target",)))
        return out, target.logps.detach(), tokens

    def _gathered(self, out: KTOLossOutput, logps: torch.Tensor, labels: torch.Tensor,
                  tokens: int, window: MetricWindow, ids: list[str]) -> None:
        acc = self.accelerator
        check_rows(out, ids, self.step + 1, acc.gather, acc.device)  # every row, every process
        losses = acc.gather(out.loss.detach().reshape(1))
        window.add(losses.mean(), out.kl, acc.gather(out.rewards).cpu(),
                   acc.gather(logps).cpu(), acc.gather(labels).cpu(),
                   int(acc.gather(torch.tensor([tokens], device=acc.device)).sum()),
                   None if out.aux_loss is None else acc.gather(out.aux_loss.reshape(1)).mean())

    # ---- the loop ----------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        c, acc = self.config, self.accelerator
        if c.eval_only:
            return self.evaluate()
        self.model.train()
        window, started, last = MetricWindow(), time.monotonic(), None
        if self.eval_rows and self.step == 0:
            self.evaluate()  # the starting point: eval metrics of the initial weights
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not acc.is_main_process)
        loop_started, first_step = time.monotonic(), self.step
        while self.step < self.total_steps:
            epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
            order = self._order(epoch)
            self._step_ids: list[str] = []
            for micro in range(c.gradient_accumulation_steps):
                idx = micro_batch_rows(order, step_in_epoch, micro, acc.process_index,
                                       c.per_device_train_batch_size,
                                       c.gradient_accumulation_steps, acc.num_processes)
                batch = self._batch(self.rows, idx)
                self._step_ids += batch["ids"]
                # syncs gradients on the last micro-batch only; backward divides the loss
                # by the accumulation steps (DeepSpeed: its engine does)
                with acc.accumulate(self.model):
                    out, logps, tokens = self.forward_loss(batch)
                    self._gathered(out, logps, batch["labels"], tokens, window, batch["ids"])
                    acc.backward(out.loss)
            grad_norm = self._optimizer_step()
            self.step += 1
            bar.update(1)
            if self.step == 1 or self.step % c.logging_steps == 0 or self.step == self.total_steps:
                last = self._log(window, grad_norm, time.monotonic() - started, bar)
                window, started = MetricWindow(), time.monotonic()
            if c.eval_steps and self.eval_rows and self.step % c.eval_steps == 0:
                self.evaluate()
            if c.save_steps and self.step % c.save_steps == 0:
                self.checkpoints.save(self.step, self.step / self.steps_per_epoch)
            self._stop_if_signalled()
        bar.close()
        self.timing = {"steps_run": self.step - first_step,
                       "train_seconds": round(time.monotonic() - loop_started, 3)}
        if self.eval_rows and not (c.eval_steps and self.step % c.eval_steps == 0):
            self.evaluate()
        # the final evaluation beside the last training window (the summary users read)
        final_eval = {k: v for k, v in getattr(self, "last_eval", {}).items()
                      if k.startswith("eval_")}
        return {**(last or {}), **final_eval}

    def _optimizer_step(self) -> float:
        c = self.config
        max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        check_grad_norm(grad_norm, self.step + 1, self.accelerator.gather,
                        self.accelerator.device, self._step_ids)
        self.lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm) if grad_norm is not None else float("nan")

    def _stop_if_signalled(self) -> None:
        """At a step boundary, when any process received a stop signal: save a checkpoint
        and raise Interrupted (the CLI exits with 128 + the signal's number)."""
        acc = self.accelerator
        pending = self.signals.pending or 0
        if not any_process(acc.gather, bool(pending), acc.device):
            return
        path = self.checkpoints.save(self.step, self.step / self.steps_per_epoch)
        name = signal.Signals(pending).name if pending else "a signal on another process"
        raise Interrupted(pending or signal.SIGTERM,
                          f"stopped by {name} after step {self.step} of {self.total_steps}; "
                          f"checkpoint saved in {path}. Rerun the same command with "
                          "--resume-from-checkpoint latest to continue")

    def _log(self, window: MetricWindow, grad_norm: float, seconds: float, bar) -> dict:
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                  **window.result(), "learning_rate": self.lr, "grad_norm": grad_norm,
                  "tokens_per_second": round(window.sums["tokens"] / max(seconds, 1e-9), 1)}
        if torch.cuda.is_available():
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if self.metrics:
            self.metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.3f}",
                            tok_s=f"{record['tokens_per_second']:.0f}")
        self.accelerator.log(tracker_values(record, self.config.report_to), step=self.step)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Every eval row once, in cache order, in batches of the training micro-batch size."""
        acc, b = self.accelerator, self.config.per_device_train_batch_size
        self.model.eval()
        window = MetricWindow()
        span, n = b * acc.num_processes, len(self.eval_rows)
        stop = n if acc.num_processes == 1 else n - n % span  # gathers need equal sizes
        for start in range(0, stop, span):
            first = start + acc.process_index * b
            idx = list(range(first, min(first + b, stop)))
            batch = self._batch(self.eval_rows, idx)
            out, logps, tokens = self.forward_loss(batch)
            self._gathered(out, logps, batch["labels"], tokens, window, batch["ids"])
        self.model.train()
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                  **window.result("eval_")}
        if self.metrics:
            self.metrics.write(record)
        acc.log(tracker_values(record, self.config.report_to), step=self.step)
        self.last_eval = record
        return record

    # ---- save and clean up ----------------------------------------------------------
    def save(self) -> None:
        with writing(self.out):
            save_final(self.accelerator, self.model, self.tokenizer, self.config, self.out,
                       self.processor)

    def cleanup(self) -> None:
        """Safe after a partial setup. An --output this run created and left empty (a
        refused run) is removed."""
        try:
            if hasattr(self, "accelerator"):
                self.accelerator.end_training()
        finally:
            if getattr(self, "_lock", None) is not None:
                self._lock.release()
            if self.run_log:
                self.run_log.close()
            if getattr(self, "_created", False):
                with contextlib.suppress(OSError):  # not empty: a run's outputs stay
                    self.out.rmdir()
