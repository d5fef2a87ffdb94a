"""Where a generation step's time goes: og.Engine and og.Generator variants, step by step.

Each variant runs in its own process (a paged engine reserves a share of GPU memory until its
process ends), prompt 128 / 128 new tokens, and reports the prefill time, the median decode
step and tokens/s. Run after ``python -m bench.gpu_engine build --work /tmp/gpu``:

    python -m bench.gpu_probe --work /tmp/gpu --out $OUT/probe.json [--only NAME,NAME]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu_common import NEW, PROMPT, engine_pass, prompt_array

GRAPH = {"model": {"decoder": {"session_options": {"provider_options": [
    {"cuda": {"enable_cuda_graph": "1"}}]}}}}  # fmt: skip


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _batching(**kw: Any) -> dict[str, Any]:
    return {"engine": {"dynamic_batching": kw}}


VARIANTS: dict[str, tuple[str, str, dict[str, Any], list[int]]] = {
    # fp16-sluice: what `sluice model build --precision fp16 --device cuda` makes
    "sluice": ("engine", "fp16-sluice", {}, [1, 16, 64, 128]),
    "sluice-engines2": ("engines2", "fp16-sluice", {}, [64, 128, 256]),
    "sluice-sched8k": ("engine", "fp16-sluice", _batching(max_scheduled_tokens=8192), [64, 128]),
    # name: (kind, build folder, genai_config overlay, batch sizes / request counts)
    "engine-graph": ("engine", "fp16-paged", GRAPH, [1, 64, 128]),
    "engine-nograph": ("engine", "fp16-paged", {}, [128]),
    "engine-graph-noprefix": (
        "engine", "fp16-paged", _merge(GRAPH, _batching(prefix_caching=False)), [64, 128]),
    "engine-graph-sched4k": (
        "engine", "fp16-paged", _merge(GRAPH, _batching(max_scheduled_tokens=4096)), [128]),
    "engine-graph-sched32k": (
        "engine", "fp16-paged", _merge(GRAPH, _batching(max_scheduled_tokens=32768)), [128]),
    "engines2-nograph": (
        "engines2", "fp16-paged", _batching(gpu_utilization_factor=0.3), [64, 128, 256]),
    "engines2-graph": (
        "engines2", "fp16-paged", _merge(GRAPH, _batching(gpu_utilization_factor=0.3)),
        [64, 128, 256]),
    "generator": ("generator", "fp16", {}, [32, 64, 128]),
    "generator-b128": ("generator", "fp16", {"search": {"batch_size": 128}}, [1, 64, 128]),
    "generator-b128-graph": (
        "generator", "fp16", _merge(GRAPH, {"search": {"batch_size": 128}}), [1, 64, 128]),
    "generator-paged": ("generator", "fp16-paged", {}, [64, 128]),
    "generator-int8-b128": ("generator", "int8", {"search": {"batch_size": 128}}, [64, 128]),
    "generator-int8-b128-graph": (
        "generator", "int8", _merge(GRAPH, {"search": {"batch_size": 128}}), [64, 128]),
}  # fmt: skip


def _model(folder: Path, overlay: dict[str, Any]) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if overlay:
        config.overlay(json.dumps(overlay))
    return og.Model(config)


def _summary(n: int, wall: float, tokens: int, steps: list[float]) -> dict[str, Any]:
    decode = steps[1:] or steps
    return {
        "n": n,
        "tokens": tokens,
        "seconds": wall,
        "tok_s": tokens / wall,
        "steps": len(steps),
        "first_step_ms": steps[0] * 1000 if steps else 0.0,
        "decode_step_median_ms": statistics.median(decode) * 1000 if decode else 0.0,
        "decode_step_max_ms": max(decode) * 1000 if decode else 0.0,
    }


def run_engine(model: Any, n: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    engine = og.Engine(model)
    engine_pass(engine, n)  # the first pass warms the shapes
    wall, tokens, steps, in_python, _ = engine_pass(engine, n)
    del engine
    return _summary(n, wall, tokens, steps) | {"python_ms": in_python * 1000}


def run_engines(models: list[Any], sizes: list[int]) -> list[dict[str, Any]]:
    """One engine per model, each on its own thread (og.Engine is owned by the thread that
    made it), warmed one at a time (graph capture is not safe in parallel), then ``n``
    requests split evenly, started together."""
    import threading

    import onnxruntime_genai as og

    lock = threading.Lock()
    barrier = threading.Barrier(len(models))
    out: dict[int, list[tuple[float, int, list[float], float, float]]] = {n: [] for n in sizes}
    errors: list[str] = []

    def work(model: Any) -> None:
        try:
            with lock:
                engine = og.Engine(model)
                for n in sizes:
                    for size in sorted({n // len(models), max(1, n // len(models) // 2), 1}):
                        engine_pass(engine, size)
        except Exception as exc:  # noqa: BLE001 - reported as the variant's finding
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            barrier.abort()
            return
        for n in sizes:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            out[n].append(engine_pass(engine, n // len(models)))
        del engine

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        return [{"n": n, "error": errors[0]} for n in sizes]
    rows = []
    for n in sizes:
        runs = out[n]
        start = min(r[4] for r in runs)
        wall = max(r[4] + r[0] for r in runs) - start
        tokens = sum(r[1] for r in runs)
        rows.append(_summary(n, wall, tokens, runs[0][2]) | {"per_engine_s": [r[0] for r in runs]})
    return rows


def run_generator(model: Any, n: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    result: dict[str, Any] = {}
    ids = prompt_array(n)
    for _ in range(2):
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=PROMPT + NEW, min_length=PROMPT + NEW, batch_size=n, do_sample=False
        )
        gen = og.Generator(model, params)
        steps: list[float] = []
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        steps.append(time.perf_counter() - t0)
        tokens = n
        while not gen.is_done():
            s0 = time.perf_counter()
            gen.generate_next_token()
            gen.get_next_tokens()
            steps.append(time.perf_counter() - s0)
            tokens += n
        wall = time.perf_counter() - t0
        # append_tokens computed the first token's logits; each step then samples one token
        result = _summary(n, wall, n * (len(steps) - 1), steps)
        del gen
    return result


def one(work: Path, name: str) -> list[dict[str, Any]]:
    kind, folder, overlay, sizes = VARIANTS[name]
    t0 = time.perf_counter()
    model = _model(work / folder, overlay)
    load = time.perf_counter() - t0
    if kind == "engines2":
        rows = run_engines([model, _model(work / folder, overlay)], sizes)
        for row in rows:
            row["load_s"] = load
            print(json.dumps({"variant": name, **row}), flush=True)
        return rows
    rows = []
    for n in sizes:
        try:
            row = run_engine(model, n) if kind == "engine" else run_generator(model, n)
        except Exception as exc:  # noqa: BLE001 - a refused variant is a finding
            row = {"n": n, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        row["load_s"] = load
        rows.append(row)
        print(json.dumps({"variant": name, **row}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_probe")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu"))
    parser.add_argument("--out", type=Path, default=Path("probe.json"))
    parser.add_argument("--only", default="")
    parser.add_argument("--one", default="")
    args = parser.parse_args()
    if args.one:
        one(args.work, args.one)
        return
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    results: dict[str, Any] = {}
    for name in names:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.gpu_probe", "--work", str(args.work), "--one", name],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        results[name] = rows or {"error": proc.stderr[-1500:]}
        for row in rows:
            keys = ("n", "tok_s", "first_step_ms", "decode_step_median_ms", "steps", "error")
            print(name, {k: row[k] for k in keys if k in row}, flush=True)
        if not rows:
            print(name, "FAILED", proc.stderr[-800:], flush=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
