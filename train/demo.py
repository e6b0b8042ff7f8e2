"""The main job on a fresh machine: SmolLM2-135M-Instruct (materialized once by
train/real_model.py), a small customer-support dataset made here (polite replies
desirable, rude ones not; train/demo_task.py), kto-precompute, then kto-train with a
held-out evaluation; prints held-out metrics and greedy replies to 3 held-out prompts,
before and after training, side by side.

    python -m train.demo [--tiny] OUTPUT_DIR        (or: make demo / make demo-tiny)

``--tiny``: the same pipeline on a tiny random Llama built here (no download, about a
minute), whose replies mean nothing; only its margins are shown. The CLIs' logs and
engine warnings go to OUTPUT_DIR/logs/; the terminal shows progress and results."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from shared.cli import quiet_deepspeed_probe
from shared.errors import KtoError

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
POLITE, RUDE = "Thank you, happy to help!", "Go away, not my problem."


def build_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """Byte-level BPE trained on ``corpus`` (deterministic), with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64,
                vocab_size: int | None = None):
    """A random Llama with head_dim 32 (vLLM's CPU attention rejects 16). ``vocab_size``
    may exceed the tokenizer's: extra rows cost compute like a real vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden,
        intermediate_size=2 * hidden if hidden == 64 else 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32, max_position_embeddings=2048,
        initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_model(directory: Path, corpus: list[str], seed: int = 0, **shape) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus)
    build_model(tokenizer, seed, **shape).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def polite_records(prompts: range) -> list[dict]:
    out = []
    for i in prompts:
        prompt = [{"role": "user", "content": f"Customer {i} asks about order {i * 7 % 100}."}]
        out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": POLITE}],
                    "label": True})
        out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": RUDE}],
                    "label": False})
    return out


BARS = ("score:", "train:")  # the CLIs' progress bars: the only stderr the terminal shows


def _echo_bars(stream, log) -> None:
    """Copy a CLI's stderr to its log; echo only its progress bars (tqdm redraws a
    line with carriage returns) to the terminal."""
    shown, pending = False, b""
    for chunk in iter(lambda: stream.read1(4096), b""):
        log.write(chunk)
        pending += chunk
        *parts, pending = pending.replace(b"\r", b"\n").split(b"\n")
        for part in parts:
            text = part.decode("utf-8", "replace")
            if text.startswith(BARS):
                sys.stdout.write("\r  " + text)
                sys.stdout.flush()
                shown = True
    if shown:
        sys.stdout.write("\n")


def run_cli(cmd: list[str], log_path: Path) -> dict:
    """Run one CLI in its own process, as a user would; returns its JSON summary."""
    import threading

    print("$", " ".join(cmd), flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader = threading.Thread(target=_echo_bars, args=(proc.stderr, log))
        reader.start()
        stdout = proc.stdout.read().decode()
        reader.join()
        proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        sys.exit(f"{Path(cmd[0]).name} failed (exit {proc.returncode}); the end of its log "
                 f"{log_path}:\n" + "\n".join(tail))
    return json.loads(stdout[stdout.index("{"):])


def precompute(model: Path, out: Path, name: str) -> None:
    """--backend hf: on CPU vLLM's engine start (about 20-25 s, twice) would take longer
    than scoring these few rows."""
    run_cli([str(Path(sys.executable).parent / "kto-precompute"), "--model", str(model),
             "--data", str(out / "data" / f"{name}.json"), "--output", str(out / f"cache-{name}"),
             "--backend", "hf", "--overwrite"], out / "logs" / f"kto-precompute-{name}.log")


def train(model: Path, out: Path, options: list[str]) -> tuple[dict, dict]:
    """kto-train with the held-out cache; the first and the last evaluation."""
    final = run_cli([str(Path(sys.executable).parent / "kto-train"), "--model", str(model),
                     "--cache", str(out / "cache-train"), "--eval-cache", str(out / "cache-eval"),
                     "--output", str(out / "policy"), *options], out / "logs" / "kto-train.log")
    evals = [json.loads(line) for line in (out / "policy" / "metrics.jsonl").read_text()
             .splitlines() if "eval_loss" in line]
    return final, {"first": evals[0], "last": evals[-1]}


def write_data(out: Path, train_records: list[dict], eval_records: list[dict]) -> None:
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train_records), ("eval", eval_records)):
        (out / "data" / f"{name}.json").write_text(json.dumps(records, indent=1))


def summary(final: dict, evals: dict, rows: int) -> str:
    a, b = evals["first"], evals["last"]

    def change(key: str, digits: int = 4) -> str:
        return f"{a[key]:.{digits}f} -> {b[key]:.{digits}f}"

    return (f"trained {final['step']} steps; held-out ({rows} rows) at step 0 -> step {b['step']}:"
            f"\n  rewards/margins {change('eval_rewards/margins')}"
            f"\n  eval loss       {change('eval_loss')}"
            f"\n  logps/chosen    {change('eval_logps/chosen', 2)} (polite replies)"
            f"\n  logps/rejected  {change('eval_logps/rejected', 2)} (rude replies)")


# Real model: 48 training prompts (96 rows), 16 held-out prompts (32 rows), 2 epochs of
# batch 8 = 24 steps. At --learning-rate 1e-5 the held-out margins rose to 4.4 but the
# greedy replies hardly changed; at 3e-5 they took the polite replies' tone (README,
# "The main job"), in a few minutes on 2 cores.
REAL = {"train_prompts": 48, "eval_prompts": 16, "shown": 3,
        "train": ["--learning-rate", "3e-5", "--per-device-train-batch-size", "8",
                  "--num-train-epochs", "2", "--logging-steps", "4", "--eval-steps", "12"]}
TINY_TRAIN = ["--learning-rate", "1e-3", "--per-device-train-batch-size", "8",
              "--num-train-epochs", "1", "--logging-steps", "4", "--eval-steps", "12"]


def run_real(out: Path) -> None:
    from train import demo_task
    from train.real_model import NAME, default_dir, is_complete, materialize

    t0 = time.monotonic()
    if not is_complete(default_dir()):
        print(f"materializing {NAME} in {default_dir()} (once; about a minute) ...", flush=True)
    model = materialize()
    print(f"model: {NAME} in {model} ({time.monotonic() - t0:.0f} s)", flush=True)
    eval_records = demo_task.support_records(REAL["eval_prompts"], held_out=True)
    write_data(out, demo_task.support_records(REAL["train_prompts"], held_out=False),
               eval_records)
    precompute(model, out, "train")
    precompute(model, out, "eval")
    shown = demo_task.prompts_of(eval_records, REAL["shown"])
    print(f"greedy replies of {NAME} to {len(shown)} held-out prompts ...", flush=True)
    before = demo_task.generate(str(model), shown)
    final, evals = train(model, out, REAL["train"])
    print("greedy replies of the trained policy ...", flush=True)
    after = demo_task.generate(str(out / "policy"), shown)
    print("\n" + summary(final, evals, len(eval_records)) + "\n")
    print(demo_task.side_by_side(shown, before, after))
    print(f"policy in {out / 'policy'}; metrics in {out / 'policy' / 'metrics.jsonl'}; "
          f"logs in {out / 'logs'}")


def run_tiny(out: Path) -> None:
    train_records, eval_records = polite_records(range(0, 96)), polite_records(range(1000, 1032))
    write_data(out, train_records, eval_records)
    model = save_model(out / "tiny-model", [json.dumps(train_records + eval_records)])
    precompute(model, out, "train")
    precompute(model, out, "eval")
    final, evals = train(model, out, TINY_TRAIN)
    print("\n" + summary(final, evals, len(eval_records)))
    print(f"policy in {out / 'policy'}; metrics in {out / 'policy' / 'metrics.jsonl'}")


@click.command(help="The main job on a fresh machine (README, 'The main job').")
@click.argument("output", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--tiny", is_flag=True,
              help="A tiny random Llama instead of SmolLM2 (no download; replies mean nothing).")
def main(output: Path | None, tiny: bool) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars are not the demo's progress
    quiet_deepspeed_probe()
    out = output or Path("runs/demo-tiny" if tiny else "runs/demo")
    t0 = time.monotonic()
    try:
        (run_tiny if tiny else run_real)(out)
    except KtoError as err:
        raise click.ClickException(str(err)) from err
    print(f"demo done in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
