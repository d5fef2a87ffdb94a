"""Measure the built demo models' held-out accuracy with onnxruntime-genai.

For each built folder (``cpu-fp32``, ``cpu-int8``) this renders every held-out question with
the folder's chat template, encodes it with ``og.Tokenizer``, decodes greedily with
``og.Generator`` until ``<|im_end|>`` and checks the answer with :func:`task.check`. It prints
a table and writes ``models/demo/accuracy.json`` (accuracy per variant and per kind of question,
total file size of each folder, and the int8/fp32 ratios).

Usage: ``python models/demo/evaluate.py [--n N] [--seed S]``
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import onnxruntime_genai as og

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:  # run as a script: make the repository root importable
    sys.path.insert(0, ROOT)

from models.demo import task  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = ("cpu-fp32", "cpu-int8")
ACCURACY_JSON = HERE / "accuracy.json"
MAX_NEW_TOKENS = 24


def chat_template(model_dir: Path) -> jinja2.Template:
    """The folder's chat template, as a Sluice preprocess renders it."""
    config = json.loads((model_dir / "tokenizer_config.json").read_text("utf-8"))
    return jinja2.Environment().from_string(config["chat_template"])


def render_prompt(template: jinja2.Template, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return template.render(messages=messages, add_generation_prompt=True)


def folder_bytes(model_dir: Path) -> int:
    """Total size of the files in a model folder."""
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())


class GenaiModel:
    """A built model folder loaded with onnxruntime-genai, answering greedily on one thread."""

    def __init__(self, model_dir: Path, threads: int = 1) -> None:
        config = og.Config(str(model_dir))
        options = {"session_options": {"intra_op_num_threads": threads}}
        config.overlay(json.dumps({"model": {"decoder": options}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.template = chat_template(model_dir)

    def encode_prompt(self, question: str) -> list[int]:
        ids = self.tokenizer.encode(render_prompt(self.template, question))
        return [int(i) for i in ids]

    def answer(self, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        prompt = self.encode_prompt(question)
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        return str(self.tokenizer.decode(np.asarray(new, dtype=np.int32)))


@dataclass(frozen=True, slots=True)
class Score:
    correct: int
    total: int
    by_kind: dict[str, float]
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def score(model: GenaiModel, examples: Sequence[task.Example]) -> Score:
    right: dict[str, list[bool]] = defaultdict(list)
    start = time.perf_counter()
    for ex in examples:
        right[ex.kind].append(task.check(ex.question, model.answer(ex.question)))
    seconds = time.perf_counter() - start
    by_kind = {k: sum(v) / len(v) for k, v in sorted(right.items())}
    return Score(sum(sum(v) for v in right.values()), len(examples), by_kind, seconds)


def evaluate(n: int, seed: int) -> dict[str, Any]:
    examples = task.held_out(n, seed=seed)
    results: dict[str, Any] = {"held_out": {"n": n, "seed": seed}, "variants": {}}
    print(f"{'variant':<10} {'accuracy':>9} {'size MiB':>9} {'ms/q':>6}  by kind")
    for variant in VARIANTS:
        model_dir = HERE / variant
        s = score(GenaiModel(model_dir), examples)
        size = folder_bytes(model_dir)
        kinds = " ".join(f"{k}={v:.3f}" for k, v in s.by_kind.items())
        ms = 1000 * s.seconds / s.total
        print(f"{variant:<10} {s.accuracy:>9.4f} {size / 2**20:>9.2f} {ms:>6.1f}  {kinds}")
        results["variants"][variant] = {
            "accuracy": round(s.accuracy, 4),
            "correct": s.correct,
            "total": s.total,
            "by_kind": {k: round(v, 4) for k, v in s.by_kind.items()},
            "size_bytes": size,
        }
    fp32, int8 = (results["variants"][v] for v in VARIANTS)
    results["int8_over_fp32"] = {
        "accuracy": round(int8["accuracy"] / fp32["accuracy"], 4),
        "size": round(int8["size_bytes"] / fp32["size_bytes"], 4),
    }
    ratio = results["int8_over_fp32"]
    print(f"int8/fp32: accuracy {ratio['accuracy']:.4f}, size {ratio['size']:.4f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Held-out accuracy of the built demo models.")
    parser.add_argument("--n", type=int, default=1000, help="held-out questions to ask")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=ACCURACY_JSON)
    args = parser.parse_args()
    results = evaluate(args.n, args.seed)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
