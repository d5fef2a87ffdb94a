"""The models the GPU benchmark measures, made on the GPU machine (``gpu_engine build``).

``build`` makes a Qwen2-1.5B-shaped model with random weights (hidden 1536, 28 layers, 12 heads,
2 KV heads, intermediate 8960, vocab 151936) and builds it with the genai builder: fp16 with
paged attention (what og.Engine needs to batch), plain fp16 and INT8 (og.Generator), plus
``fp16-sluice`` the way ``sluice model build`` makes it. ``with_overlay`` derives a variant of a
build whose CUDA provider options or batching settings differ, without copying the weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PAGED = (
    "use_paged_attention=true",
    "max_batch_size=128",
    "max_scheduled_tokens=16384",
    "paged_block_size=128",
)
# "fp16-sluice" is built by `sluice model build --precision fp16 --device cuda` (its engine
# defaults: paged attention, pruned LM head, CUDA graphs, a pinned KV cache); the others are
# the builder's own, for the comparisons.
BUILDS: dict[str, list[str]] = {
    "fp16-paged": ["-p", "fp16", "-e", "cuda", "--extra_options", *PAGED],
    "fp16": ["-p", "fp16", "-e", "cuda"],
    "int8": ["-p", "int8", "-e", "cuda"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_hf(out: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=151643,
        bos_token_id=151643,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model: Any = Qwen2ForCausalLM(config)
    model = model.to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(REPO / "models" / "demo" / "tokenizer" / name, out / name)
    log(f"HF model written to {out}")


def build(work: Path) -> None:
    hf = work / "hf"
    if not (hf / "config.json").exists():
        make_hf(hf)
    procs: dict[str, tuple[subprocess.Popen[bytes], Any]] = {}
    for name, args in BUILDS.items():
        out = work / name
        if (out / "genai_config.json").exists():
            continue
        logf = (work / f"build-{name}.log").open("wb")
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf),
            "-o",
            str(out),
            "-c",
            str(work / f"cache-{name}"),
            *args,
        ]
        procs[name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), logf)
        log(f"building {name}: {' '.join(args)}")
    if not (work / "fp16-sluice" / "genai_config.json").exists():
        from stages.engines.modelbuild import build_model

        log("building fp16-sluice with sluice model build's defaults")
        build_model(hf, work / "fp16-sluice", "fp16", "cuda", {}, lambda line: None)
        log("build fp16-sluice done")
    for name, (proc, logf) in procs.items():
        code = proc.wait(timeout=540)
        logf.close()
        tail = (work / f"build-{name}.log").read_text(errors="replace")[-1500:]
        log(f"build {name} exit {code}" + ("" if code == 0 else f"\n{tail}"))


def with_overlay(
    src: Path, dst: Path, provider_options: dict[str, str], batching: dict[str, Any] | None = None
) -> Path:
    """A copy of a built folder (model files linked) whose CUDA provider options differ."""
    if not (src / "genai_config.json").exists():  # that build was not made: nothing to copy
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if f.name != "genai_config.json" and not target.exists():
            target.symlink_to(f)
    config = json.loads((src / "genai_config.json").read_text())
    for entry in config["model"]["decoder"]["session_options"].get("provider_options", []):
        if "cuda" in entry:
            entry["cuda"].update(provider_options)
    if batching:
        config["engine"]["dynamic_batching"].update(batching)
    (dst / "genai_config.json").write_text(json.dumps(config, indent=2))
    return dst
