"""What the GPU benchmarks share: the workload shape, its prompts and the bare og.Engine loop.

``bench.gpu_engine`` and ``bench.gpu_probe`` both import this; neither imports the other.
"""

from __future__ import annotations

import time
from typing import Any

PROMPT, NEW = 128, 128


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 100_000, size=PROMPT).tolist() for _ in range(n)]


def prompt_array(n: int) -> Any:
    import numpy as np

    return np.asarray(prompts(n, seed=n), dtype=np.int32)


def engine_pass(engine: Any, n: int) -> tuple[float, int, list[float], float, float]:
    """Submit ``n`` prompts at once and step until all finish: (wall, tokens, steps, python s,
    start time)."""
    import onnxruntime_genai as og

    token = int(og.EngineEventFlags.TOKEN.value)
    buffer = engine.create_event_buffer(1024)
    requests = []
    t0 = time.perf_counter()
    for row in prompt_array(n):
        req = engine.create_request()
        opts = og.TurnOptions(req)
        opts.set_max_generated_tokens(NEW)
        req.begin_turn(row, opts)
        requests.append(req)
    steps: list[float] = []
    in_python = 0.0
    tokens = 0
    while engine.has_pending_requests():
        s0 = time.perf_counter()
        events = engine.run(buffer)
        s1 = time.perf_counter()
        steps.append(s1 - s0)
        for event in events:
            if int(event.flags.value) & token:
                tokens += 1
        in_python += time.perf_counter() - s1
    wall = time.perf_counter() - t0
    for req in requests:
        req.close()
    return wall, tokens, steps, in_python, t0
