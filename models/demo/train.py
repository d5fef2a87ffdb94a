"""Train the demo model: a small Qwen2 decoder on the synthetic task of ``task.py``.

Deterministic (fixed seeds, deterministic torch algorithms, one CPU thread) and a few minutes
long on one core. Writes a Hugging Face model folder (``models/demo/hf/``: config.json,
model.safetensors, generation_config.json and the tokenizer files of ``tokenizer/``) and prints
the held-out accuracy of greedy decoding in torch.

The training samples are the chat template of ``tokenizer/`` applied to one user question and
the assistant answer; the loss is taken on the answer tokens and the closing ``<|im_end|>`` only.

Usage: ``python models/demo/train.py [--steps N] [--batch-size B] [--out DIR]``
"""

from __future__ import annotations

import os

# One core for training: set before torch is imported so its thread pools see it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import jinja2
import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:  # run as a script: make the repository root importable
    sys.path.insert(0, ROOT)

from models.demo import task  # noqa: E402

HERE = Path(__file__).resolve().parent

TOKENIZER_DIR = HERE / "tokenizer"
DEFAULT_OUT = HERE / "hf"
SEED = 20240604
IGNORE = -100


class ChatEncoder:
    """Renders questions with the tokenizer's chat template and turns them into token ids."""

    def __init__(self, tokenizer_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text("utf-8"))
        self.template = jinja2.Environment().from_string(config["chat_template"])
        self.eos_id = self._id(config["eos_token"])
        self.pad_id = self._id(config["pad_token"])
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return int(token_id)

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": question}]
        return self.template.render(messages=messages, add_generation_prompt=True)

    def prompt_ids(self, question: str) -> list[int]:
        return list(self.tokenizer.encode(self.prompt(question)).ids)

    def answer_ids(self, answer: str) -> list[int]:
        return [*self.tokenizer.encode(answer).ids, self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


def model_config(vocab_size: int, eos_id: int, pad_id: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        architectures=["Qwen2ForCausalLM"],
    )


def make_batch(
    enc: ChatEncoder, examples: Sequence[task.Example]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (IGNORE outside the answers)."""
    rows: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        prompt, answer = enc.prompt_ids(ex.question), enc.answer_ids(ex.answer)
        rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), enc.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return input_ids, mask, labels


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def greedy_answers(
    model: Qwen2ForCausalLM, enc: ChatEncoder, questions: Sequence[str], max_new_tokens: int = 24
) -> list[str]:
    """Greedy answers, batching prompts of equal length so that no padding is needed."""
    model.train(False)
    by_length: dict[int, list[int]] = defaultdict(list)
    prompts = [enc.prompt_ids(q) for q in questions]
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    answers = [""] * len(questions)
    for indices in by_length.values():
        seqs = torch.tensor([prompts[i] for i in indices], dtype=torch.long)
        generated: list[list[int]] = [[] for _ in indices]
        done = [False] * len(indices)
        for _ in range(max_new_tokens):
            logits = model(input_ids=seqs).logits[:, -1, :]
            nxt = logits.argmax(dim=-1)
            for j, tok in enumerate(nxt.tolist()):
                if not done[j]:
                    if tok == enc.eos_id:
                        done[j] = True
                    else:
                        generated[j].append(tok)
            if all(done):
                break
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        for j, i in enumerate(indices):
            answers[i] = enc.decode(generated[j])
    return answers


def accuracy(
    model: Qwen2ForCausalLM, enc: ChatEncoder, examples: Sequence[task.Example]
) -> tuple[float, dict[str, float]]:
    """Overall and per-kind share of examples answered correctly."""
    answers = greedy_answers(model, enc, [ex.question for ex in examples])
    right: dict[str, list[bool]] = defaultdict(list)
    for ex, ans in zip(examples, answers, strict=True):
        right[ex.kind].append(task.check(ex.question, ans))
    total = sum(sum(v) for v in right.values()) / len(examples)
    return total, {k: sum(v) / len(v) for k, v in sorted(right.items())}


def save(model: Qwen2ForCausalLM, enc: ChatEncoder, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig.from_dict(
        {
            "bos_token_id": enc.pad_id,
            "eos_token_id": enc.eos_id,
            "pad_token_id": enc.pad_id,
            "do_sample": False,
            "max_new_tokens": 32,
        }
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(TOKENIZER_DIR / name, out_dir / name)


def train(steps: int, batch_size: int, lr: float, out_dir: Path, eval_n: int) -> float:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(SEED)
    torch.manual_seed(SEED)

    enc = ChatEncoder(TOKENIZER_DIR)
    config = model_config(enc.vocab_size, enc.eos_id, enc.pad_id)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers")

    examples = task.train_examples(steps * batch_size, seed=SEED)
    held = task.held_out(eval_n)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    warmup = max(1, steps // 20)
    start = time.monotonic()
    running = 0.0
    for step in range(steps):
        model.train()
        for group in optim.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        batch = examples[step * batch_size : (step + 1) * batch_size]
        input_ids, mask, labels = make_batch(enc, batch)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        value = loss.item()
        running = 0.98 * running + 0.02 * value if step else value
        if (step + 1) % 200 == 0 or step + 1 == steps:
            elapsed = time.monotonic() - start
            print(f"step {step + 1}/{steps} loss {running:.4f} ({elapsed:.0f}s)", flush=True)
        if (step + 1) % 500 == 0 and step + 1 < steps:
            acc, _ = accuracy(model, enc, held[:200])
            print(f"  held-out accuracy (200) {acc:.3f}", flush=True)
    train_s = time.monotonic() - start

    acc, per_kind = accuracy(model, enc, held)
    kinds = " ".join(f"{k}={v:.3f}" for k, v in per_kind.items())
    print(f"trained in {train_s:.0f}s; held-out accuracy (torch fp32, greedy) over {len(held)}:")
    print(f"  {acc:.4f}  ({kinds})")
    save(model, enc, out_dir)
    print(f"saved {out_dir}")
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    train(args.steps, args.batch_size, args.lr, args.out, args.eval_n)


if __name__ == "__main__":
    main()
