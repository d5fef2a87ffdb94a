"""The compute engine's two paths on CPU, side by side: og.Engine vs static og.Generator batches.

Runs the committed demo model (``models/demo/cpu-int8``) through ``OnnxEngine`` in ``engine``
and ``generator`` mode, alternating (A, B, A, B) so drift hits both, at 1, 8 and 64 concurrent
held-out questions (24 new tokens at most). It reports the best of 3 waves per level, and how
many answers were right. This is what ``SLUICE_ENGINE_MODE=auto`` on CPU is chosen from.

    python -m bench.cpu_engine [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any, Literal

from bench.common import REPO_ROOT, machine, results_path, write_json
from models.demo import task
from schemas.messages import SamplingParams
from stages.engines.base import GenerationRequest
from stages.engines.onnx import OnnxEngine
from stages.text import TextModel

MODEL = REPO_ROOT / "models" / "demo" / "cpu-int8"
LEVELS = (1, 8, 64)
WAVES = 3


Mode = Literal["engine", "generator"]


async def measure(mode: Mode, threads: int) -> dict[str, Any]:
    text = TextModel.load(MODEL)
    examples = task.held_out(max(LEVELS), seed=5)
    requests = [
        GenerationRequest(
            ex.question,
            text.encode(text.render([{"role": "user", "content": ex.question}])),
            SamplingParams(max_tokens=24),
        )
        for ex in examples
    ]
    engine = OnnxEngine(MODEL, mode=mode, threads=threads)
    await engine.start()
    rows: dict[str, Any] = {}
    try:
        for n in LEVELS:
            rates: list[float] = []
            right = 0
            for _ in range(WAVES):
                t0 = time.perf_counter()
                gens = await asyncio.gather(*(engine.generate(r) for r in requests[:n]))
                wall = time.perf_counter() - t0
                rates.append(sum(len(g.output_ids) for g in gens) / wall)
                right = sum(
                    task.check(ex.question, text.decode(g.output_ids))
                    for ex, g in zip(examples, gens, strict=False)
                )
            rows[str(n)] = {"tok_s": max(rates), "tok_s_waves": rates, "right": right}
    finally:
        await engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_engine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"engine": [], "generator": []}
    order: list[Mode] = ["engine", "generator", "engine", "generator"]
    for mode in order:
        rows = asyncio.run(measure(mode, args.threads))
        runs[mode].append(rows)
        line = "  ".join(
            f"{n}: {r['tok_s']:>7,.0f} tok/s ({r['right']}/{n})" for n, r in rows.items()
        )
        print(f"{mode:>9}  {line}", flush=True)
    path = write_json(
        results_path("cpu-engine", args.out),
        {
            "machine": machine(),
            "model": str(MODEL.relative_to(REPO_ROOT)),
            "threads": args.threads,
            "levels": list(LEVELS),
            "runs": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
