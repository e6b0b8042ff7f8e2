"""The demo's task for the real model: customer-support replies, polite (desirable) or
rude (undesirable), made here from templates with a fixed seed. Held-out prompts use
names, items and order numbers that no training prompt has, so a policy that gains on
them learned the tone, not the strings. Also: greedy generations, printed side by side."""

from __future__ import annotations

import random
import textwrap

NAMES = ["Maria", "Tom", "Priya", "Chen", "Fatima", "Lukas", "Aisha", "Diego", "Yuki", "Olga",
         "Kwame", "Sofia", "Ravi", "Emma", "Omar", "Lena", "Hiro", "Nadia", "Pablo", "Grace"]
HELD_OUT_NAMES = ["Ingrid", "Tariq", "Beatriz", "Sven", "Mei", "Jonas", "Amara", "Felix"]
ITEMS = ["blue kettle", "desk lamp", "pair of headphones", "rain jacket", "coffee grinder",
         "yoga mat", "phone case", "wool scarf", "toaster", "backpack", "water bottle",
         "bike light", "cutting board", "table fan", "hiking boots", "alarm clock"]
HELD_OUT_ITEMS = ["garden hose", "laptop stand", "teapot", "sleeping bag", "wall clock",
                  "blender", "umbrella", "winter gloves"]

# (user message, polite reply, rude reply); filled with name, item and order number.
TEMPLATES = [
    ("Hi, I'm {name}. My order {num} ({item}) still hasn't arrived. Where is it?",
     "I'm sorry for the wait, {name}! I checked order {num}: your {item} is on its way and "
     "should arrive within three days.",
     "Not my problem, {name}. Order {num} gets there when it gets there."),
    ("This is {name}. The {item} from order {num} arrived broken. What now?",
     "I'm so sorry, {name}! I have sent you a free replacement {item} for order {num}; "
     "there is no need to return the broken one.",
     "You probably broke the {item} yourself, {name}. Order {num} is closed."),
    ("Can I return the {item} from order {num}? It is not what I expected. - {name}",
     "Of course, {name}! I have emailed you a free return label for the {item} from "
     "order {num}.",
     "No, {name}. Order {num} is final. Deal with it."),
    ("{name} here: can you change the delivery address of order {num}?",
     "Happy to help, {name}! Reply with the new address and I will update order {num} "
     "right away.",
     "Change it yourself, {name}. I am not touching order {num}."),
]


def support_records(n_prompts: int, held_out: bool, seed: int = 0) -> list[dict]:
    """``n_prompts`` prompts, each with a polite (desirable) and a rude (undesirable)
    reply, as prompt/completion message lists (rendered with the model's chat template)."""
    rng = random.Random(seed + (1 if held_out else 0))
    names, items = (HELD_OUT_NAMES, HELD_OUT_ITEMS) if held_out else (NAMES, ITEMS)
    numbers = range(5000, 10000) if held_out else range(1000, 5000)
    out = []
    for i in range(n_prompts):
        user, polite, rude = TEMPLATES[i % len(TEMPLATES)]
        fill = {"name": rng.choice(names), "item": rng.choice(items),
                "num": rng.choice(numbers)}
        prompt = [{"role": "user", "content": user.format(**fill)}]
        for reply, label in ((polite, True), (rude, False)):
            out.append({"prompt": prompt, "label": label,
                        "completion": [{"role": "assistant", "content": reply.format(**fill)}]})
    return out


def prompts_of(records: list[dict], n: int) -> list[list[dict]]:
    """The first ``n`` distinct prompts (records come in polite/rude pairs)."""
    return [records[2 * i]["prompt"] for i in range(n)]


def generate(model_dir: str, prompts: list[list[dict]], max_new_tokens: int = 40) -> list[str]:
    """Greedy replies. One thread: decoding is a chain of small matmuls that a second
    thread barely speeds up, and that slowed down 10-20x when another process held the
    other core (measured on this 2-core machine)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        replies = []
        for messages in prompts:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[0, ids["input_ids"].shape[1]:]
            replies.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        return replies
    finally:
        torch.set_num_threads(threads)


def side_by_side(prompts: list[list[dict]], before: list[str], after: list[str],
                 width: int = 48) -> str:
    """Each prompt, then its two replies in two columns."""
    lines = []
    for messages, b, a in zip(prompts, before, after, strict=True):
        lines.append(f"prompt: {messages[-1]['content']}")
        left, right = textwrap.wrap(b, width) or [""], textwrap.wrap(a, width) or [""]
        lines.append(f"  {'before training':<{width}} | after training")
        for i in range(max(len(left), len(right))):
            lines.append(f"  {(left[i] if i < len(left) else ''):<{width}} | "
                         f"{right[i] if i < len(right) else ''}")
        lines.append("")
    return "\n".join(lines)
