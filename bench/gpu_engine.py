"""GPU benchmark of the compute engine: Sluice's engine vs og.Generator vs transformers.

Runs on a CUDA machine with onnxruntime-gpu and onnxruntime-genai-cuda (see docs/BENCHMARKS.md
for how they get there). Two steps, so a lease can be split:

    python -m bench.gpu_engine build   --work /tmp/gpu        # HF model + three ONNX builds
    python -m bench.gpu_engine measure --work /tmp/gpu --out results.json

``build`` makes a Qwen2-1.5B-shaped model with random weights and builds it three ways with the
genai builder, plus the way ``sluice model build`` does (``bench/gpu_build.py``).
``measure`` runs prompt 128 / 128 new tokens: tokens/s through ``OnnxEngine`` at 1, 16, 64 and
128 concurrent requests (and variants), og.Generator at the same batch sizes, transformers
``generate`` (fp16, eager) at batch 1 and 64, and cold start (process start to ready).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpu_build import REPO, build, log, with_overlay
from bench.gpu_common import NEW, PROMPT, prompts

CONCURRENCY = (1, 16, 64, 128)
REPEAT = 5  # passes per concurrency level; the median is reported


async def engine_run(engines: list[Any], n: int) -> dict[str, float]:
    from schemas.messages import SamplingParams
    from stages.engines.base import GenerationRequest

    reqs = [
        GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=NEW))
        for i, p in enumerate(prompts(n, seed=n))
    ]
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(engines[i % len(engines)].generate(r) for i, r in enumerate(reqs))
    )
    wall = time.perf_counter() - t0
    tokens = sum(len(r.output_ids) for r in results)
    ttft = sorted(r.ttft_s for r in results)
    return {
        "requests": n,
        "tokens": tokens,
        "seconds": wall,
        "tok_s": tokens / wall,
        "ttft_p50_ms": ttft[len(ttft) // 2] * 1000,
    }


def median_row(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The run with the median tokens/s, plus every run's tokens/s (single runs drift ~10%)."""
    ordered = sorted(runs, key=lambda r: r["tok_s"])
    return ordered[len(ordered) // 2] | {"tok_s_runs": [r["tok_s"] for r in runs]}


async def measure_engine(folder: Path, copies: int = 1) -> list[dict[str, float]]:
    from stages.engines.onnx import OnnxEngine

    threads = int(os.environ.get("BENCH_ENGINE_THREADS", "0"))  # onnxruntime intra-op threads
    engines = [OnnxEngine(folder, stall_s=120, threads=threads) for _ in range(copies)]
    for e in engines:
        await e.start()
    try:
        for n in CONCURRENCY:  # warm every batch shape once
            await engine_run(engines, n)
        rows = []
        for n in CONCURRENCY:
            runs = [await engine_run(engines, n) for _ in range(REPEAT)]
            row = median_row(runs)
            log(
                f"  engine x{copies} {folder.name}: {n:>3} requests {row['tok_s']:>9,.0f} tok/s "
                f"(median of {REPEAT}: {', '.join(f'{r:,.0f}' for r in row['tok_s_runs'])})"
            )
            rows.append(row)
        return rows
    finally:
        for e in engines:
            await e.close()


def measure_generator(folder: Path) -> list[dict[str, float]]:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    limit = int(
        json.loads((folder / "genai_config.json").read_text())["search"].get("batch_size", 1)
    )
    rows = []
    for b in (x for x in (1, 16, 32, 64, 128) if x <= max(limit, 32)):
        ids = np.asarray(prompts(b, seed=b), dtype=np.int32)
        for _ in range(2):  # the first pass at a shape warms it
            params = og.GeneratorParams(model)
            params.set_search_options(
                max_length=PROMPT + NEW, min_length=PROMPT + NEW, batch_size=b, do_sample=False
            )
            gen = og.Generator(model, params)
            t0 = time.perf_counter()
            gen.append_tokens(ids)
            steps = 0
            while not gen.is_done():
                gen.generate_next_token()
                steps += 1
            wall = time.perf_counter() - t0
        row = {"batch": b, "tokens": b * steps, "seconds": wall, "tok_s": b * steps / wall}
        log(f"  generator {folder.name}: batch {b:>3} {row['tok_s']:>9,.0f} tok/s")
        rows.append(row)
    return rows


def measure_transformers(hf: Path) -> list[dict[str, float]]:
    import torch
    from transformers import Qwen2ForCausalLM

    load: Any = Qwen2ForCausalLM.from_pretrained
    model: Any = load(hf, torch_dtype=torch.float16, attn_implementation="eager").cuda().eval()
    rows = []
    for b in (1, 64):
        ids = torch.tensor(prompts(b, seed=b), device="cuda")
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        row = {"batch": b, "tokens": b * NEW, "seconds": wall, "tok_s": b * NEW / wall}
        log(f"  transformers eager fp16: batch {b:>3} {row['tok_s']:>9,.0f} tok/s")
        rows.append(row)
    del model
    torch.cuda.empty_cache()
    return rows


async def _worker(folder: Path, n: int, start_at: float) -> dict[str, float]:
    from stages.engines.onnx import OnnxEngine

    engine = OnnxEngine(folder, stall_s=120)
    await engine.start()
    try:
        await engine_run([engine], n)  # warm
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.time()
        row = await engine_run([engine], n)
        return {**row, "t0": t0, "t1": t0 + row["seconds"]}
    finally:
        await engine.close()


def measure_processes(folder: Path, copies: int, total: int) -> dict[str, float]:
    """``copies`` engine processes on one GPU, ``total`` requests split evenly, started together."""
    start_at = time.time() + 30  # after every process has loaded and warmed up
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.gpu_engine",
                "worker",
                "--model",
                str(folder),
                "--n",
                str(total // copies),
                "--start-at",
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(copies)
    ]
    rows = []
    for p in procs:
        out, _ = p.communicate(timeout=240)
        rows.append(json.loads(out.strip().splitlines()[-1]))
    wall = max(r["t1"] for r in rows) - min(r["t0"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    log(f"  {copies} engine processes, {total} requests: {tokens / wall:,.0f} tok/s")
    return {
        "processes": copies,
        "requests": total,
        "tokens": tokens,
        "seconds": wall,
        "tok_s": tokens / wall,
        "late_start_s": max(r["t0"] for r in rows) - start_at,
    }


def measure_raw(folder: Path) -> list[dict[str, Any]]:
    """og.Engine driven by a bare Python loop (no Sluice): what the wrapper costs."""
    import onnxruntime_genai as og

    from bench.gpu_common import engine_pass

    engine = og.Engine(og.Model(str(folder)))

    def one_pass(n: int) -> dict[str, float]:
        wall, tokens, *_ = engine_pass(engine, n)
        return {"requests": n, "tokens": tokens, "seconds": wall, "tok_s": tokens / wall}

    for n in CONCURRENCY:
        one_pass(n)  # warm every shape once
    rows = []
    for n in CONCURRENCY:
        row = median_row([one_pass(n) for _ in range(REPEAT)])
        log(
            f"  raw og.Engine {folder.name}: {n:>3} requests {row['tok_s']:>9,.0f} tok/s "
            f"(median of {REPEAT}: {', '.join(f'{r:,.0f}' for r in row['tok_s_runs'])})"
        )
        rows.append(row)
    return rows


def cold_start(folder: Path) -> float:
    """Seconds from launching a fresh process to its engine being warmed up and ready."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.gpu_engine", "ready", "--model", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY"):
            took = time.monotonic() - t0
            proc.wait(timeout=60)
            return took
    _, err = proc.communicate(timeout=60)
    raise RuntimeError(f"cold start failed: {err[-2000:]}")


async def _ready(folder: Path) -> None:
    """In a fresh process: load and warm up an engine, then say READY."""
    from stages.engines.onnx import OnnxEngine

    engine = OnnxEngine(folder)
    await engine.start()
    print("READY", flush=True)
    await engine.close()


def measure(work: Path, out: Path, parts: set[str]) -> None:
    import torch

    previous = json.loads(out.read_text()) if out.exists() else {}
    result: dict[str, Any] = previous | {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0),
        "prompt": PROMPT,
        "new": NEW,
    }
    try:
        import onnxruntime
        import onnxruntime_genai

        result["onnxruntime"] = onnxruntime.__version__
        result["onnxruntime_genai"] = onnxruntime_genai.__version__
    except ImportError as exc:
        result["import_error"] = str(exc)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))

    paged = work / "fp16-paged"
    graph = with_overlay(paged, work / "fp16-paged-graph", {"enable_cuda_graph": "1"})
    half = with_overlay(
        paged,
        work / "fp16-paged-graph-half",
        {"enable_cuda_graph": "1"},
        {"gpu_utilization_factor": 0.3},
    )
    big = with_overlay(
        paged,
        work / "fp16-paged-graph-big",
        {"enable_cuda_graph": "1"},
        {"gpu_utilization_factor": 0.85},
    )
    small = with_overlay(
        paged,
        work / "fp16-paged-graph-small",
        {"enable_cuda_graph": "1"},
        {"gpu_utilization_factor": 0.1},
    )
    sluice = work / "fp16-sluice"
    sluice8k = with_overlay(sluice, work / "fp16-sluice-8k", {}, {"max_scheduled_tokens": 8192})
    int8_graph = with_overlay(work / "int8", work / "int8-graph", {"enable_cuda_graph": "1"})
    steps: dict[str, tuple[str, Callable[[], Any]]] = {
        "cold-sluice": ("cold_start_fp16_sluice_s", lambda: cold_start(sluice)),
        "sluice": ("engine_fp16_sluice", lambda: asyncio.run(measure_engine(sluice))),
        "raw-sluice": ("raw_og_engine_fp16_sluice", lambda: measure_raw(sluice)),
        "sluice8k": (
            "engine_fp16_sluice_sched8k",
            lambda: asyncio.run(measure_engine(sluice8k)),
        ),
        "sluice-generator": (
            "engine_fp16_static_generator",
            lambda: asyncio.run(measure_engine(work / "fp16")),
        ),
        "int8-graph": ("engine_int8_cuda_graph", lambda: asyncio.run(measure_engine(int8_graph))),
        "cold-small": ("cold_start_fp16_paged_util01_s", lambda: cold_start(small)),
        "raw-graph": ("raw_og_engine_fp16_paged_cuda_graph", lambda: measure_raw(graph)),
        "graph-small": (
            "engine_fp16_paged_cuda_graph_util01",
            lambda: asyncio.run(measure_engine(small)),
        ),
        "cold": ("cold_start_s", lambda: {n: cold_start(work / n) for n in ("fp16-paged", "int8")}),
        "engine": ("engine_fp16_paged", lambda: asyncio.run(measure_engine(paged))),
        "graph": ("engine_fp16_paged_cuda_graph", lambda: asyncio.run(measure_engine(graph))),
        # two engines in one process, each with half the KV-cache budget
        "graph2": (
            "engine_fp16_paged_cuda_graph_x2",
            lambda: asyncio.run(measure_engine(half, copies=2)),
        ),
        "graph-util": (
            "engine_fp16_paged_cuda_graph_util085",
            lambda: asyncio.run(measure_engine(big)),
        ),
        "int8": ("engine_int8", lambda: asyncio.run(measure_engine(work / "int8"))),
        "generator": ("generator_fp16", lambda: measure_generator(work / "fp16")),
        "generator-int8": ("generator_int8", lambda: measure_generator(work / "int8")),
        "transformers": ("transformers_eager_fp16", lambda: measure_transformers(work / "hf")),
        "procs2": (
            "engine_fp16_paged_cuda_graph_2_processes",
            lambda: [measure_processes(half, 2, n) for n in (64, 128, 256)],
        ),
        "cold-half": ("cold_start_fp16_paged_util03_s", lambda: cold_start(half)),
    }
    for part, (key, fn) in steps.items():
        if part not in parts:
            continue
        try:
            result[key] = fn()
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a finding: recorded
            result[key] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            log(f"{part} failed: {exc}")
        save()
    log(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_engine")
    parser.add_argument("step", choices=["build", "measure", "worker", "ready"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu.json")
    parser.add_argument(
        "--parts",
        default="cold,engine,graph,graph-util,int8,generator,generator-int8,transformers",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "ready":
        asyncio.run(_ready(args.model))
    elif args.step == "worker":
        print(json.dumps(asyncio.run(_worker(args.model, args.n, args.start_at))), flush=True)
    elif args.step == "build":
        build(args.work)
    else:
        measure(args.work, args.out, set(args.parts.split(",")))


if __name__ == "__main__":
    main()
