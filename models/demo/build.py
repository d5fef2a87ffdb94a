"""Build the demo model for the CPU with onnxruntime-genai's model builder, in fp32 and INT8.

Runs, for each variant, the builder on ``models/demo/hf/``::

    python -m onnxruntime_genai.models.builder -i models/demo/hf -o OUT -p fp32 -e cpu
    python -m onnxruntime_genai.models.builder -i models/demo/hf -o OUT -p int8 -e cpu \\
        --extra_options block_size=128

INT8 is weight-only: every MatMul (the fused QKV, output and three MLP projections of each
layer, and the LM head) becomes a ``MatMulNBits`` with 8-bit symmetric weights and one fp32 scale
per block of 128 inputs (the default block of 32 makes the folder 3% bigger, same accuracy).
The builder's CPU default ``accuracy_level=4`` lets the kernel quantize activations to int8 on
the fly; ``accuracy_level=1`` (fp32 compute) scores the same here but runs about 5x slower.
The embedding table stays fp32: this builder quantizes a ``Gather`` (and so shares the tied
embedding with the LM head, ``shared_embeddings=true``) only at 4 bits.

The output folders ``models/demo/cpu-fp32/`` and ``models/demo/cpu-int8/`` are replaced; their
tokenizer files are then overwritten with the canonical ones of ``tokenizer/`` (the builder's
re-save through transformers drops the inline chat template) and ``genai_config.json`` is
checked for the special token ids and the context length.

Usage: ``python models/demo/build.py [--variant cpu-fp32|cpu-int8]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HF_DIR = HERE / "hf"
TOKENIZER_DIR = HERE / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Builder arguments per output folder.
VARIANTS: dict[str, list[str]] = {
    "cpu-fp32": ["-p", "fp32", "-e", "cpu"],
    "cpu-int8": [
        "-p",
        "int8",
        "-e",
        "cpu",
        "--extra_options",
        "block_size=128",
    ],
}


def builder_command(hf_dir: Path, out_dir: Path, cache_dir: Path, args: list[str]) -> list[str]:
    module = "onnxruntime_genai.models.builder"
    paths = ["-i", str(hf_dir), "-o", str(out_dir), "-c", str(cache_dir)]
    return [sys.executable, "-m", module, *paths, *args]


def _special_ids() -> dict[str, int]:
    tok = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text("utf-8"))
    ids = {t["content"]: int(t["id"]) for t in tok["added_tokens"]}
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text("utf-8"))
    return {
        "eos_token_id": ids[config["eos_token"]],
        "pad_token_id": ids[config["pad_token"]],
        "context_length": int(config["model_max_length"]),
    }


def fix_genai_config(out_dir: Path) -> dict[str, Any]:
    """Make sure genai_config.json stops at <|im_end|>, pads with <|endoftext|>, fits 256."""
    path = out_dir / "genai_config.json"
    config: dict[str, Any] = json.loads(path.read_text("utf-8"))
    want = _special_ids()
    model = config["model"]
    model["eos_token_id"] = want["eos_token_id"]
    model["pad_token_id"] = want["pad_token_id"]
    model["context_length"] = want["context_length"]
    config["search"]["max_length"] = want["context_length"]
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return config


def copy_tokenizer(out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, out_dir / name)
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text("utf-8"))
    (out_dir / "chat_template.jinja").write_text(config["chat_template"], encoding="utf-8")


def build(variant: str, hf_dir: Path = HF_DIR) -> Path:
    """Run the builder for one variant into a scratch folder, then move it into place."""
    out_dir = HERE / variant
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="sluice-demo-build-") as tmp:
        scratch = Path(tmp) / variant
        cmd = builder_command(hf_dir, scratch, Path(tmp) / "cache", VARIANTS[variant])
        print("$", " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"builder failed for {variant} (exit {done.returncode})")
        copy_tokenizer(scratch)
        fix_genai_config(scratch)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(scratch, out_dir)
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    print(f"built {out_dir} ({size / 2**20:.2f} MiB)")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the demo model with the genai builder.")
    parser.add_argument("--variant", choices=sorted(VARIANTS), action="append")
    parser.add_argument("--hf", type=Path, default=HF_DIR)
    args = parser.parse_args()
    for variant in args.variant or list(VARIANTS):
        build(variant, args.hf)


if __name__ == "__main__":
    main()
