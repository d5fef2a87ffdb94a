"""``sluice model build``: onnxruntime-genai's model builder, checked before and after it runs.

The builder (``python -m onnxruntime_genai.models.builder``) turns a Hugging Face folder into
the ONNX folder the compute stage loads. It runs in a subprocess with this interpreter, its
output streamed line by line to a ``progress`` callback. Around it:

- before: the folder's ``config.json`` names an architecture the installed builder knows, and
  the precision / device pair is one the builder accepts. Both lists are read from the installed
  builder's source (the ``config.architectures[0] == "..."`` dispatch in ``create_model`` and its
  "Valid precision + execution provider combinations" line), not copied here, so they follow
  the installed version. If that source ever changes shape, the checks are skipped with a note
  and the builder decides.
- during: the builder needs torch, transformers, onnx and onnx-ir (the ``train`` extra); they
  are never imported by Sluice itself, only looked up here.
- after: the folder is built in a scratch folder beside ``out`` and moved into place only when
  it has a ``genai_config.json``; the source's tokenizer files are copied over the builder's
  re-saved ones (its re-save through transformers drops the inline chat template that the
  preprocess stage renders).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.errors import FatalError

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8", "int4", "fp32")
DEVICES = ("cuda", "cpu")
BUILDER_MODULE = "onnxruntime_genai.models.builder"
TRAIN_EXTRA = "pip install 'sluice-llm[train]'"
# Module names the builder imports (the ``train`` extra), as importlib spells them.
BUILDER_REQUIRES = ("torch", "transformers", "onnx", "onnx_ir")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
TAIL_LINES = 30

Progress = Callable[[str], None]

# A CUDA fp16 build gets what og.Engine needs to batch (paged attention) and what made it
# fastest on the H200 (docs/BENCHMARKS.md): logits only for the tokens that are sampled
# (prune_lm_head: the prefill otherwise writes prompt x vocab logits) and CUDA graphs for the
# decode steps. --extra-option overrides any of them; use_paged_attention=false drops them all.
ENGINE_DEFAULTS = {
    "use_paged_attention": "true",
    "max_batch_size": "128",
    "max_scheduled_tokens": "16384",
    "prune_lm_head": "true",
    "enable_cuda_graph": "true",
}
# The paged KV cache is sized for max_batch_size sequences of this many tokens (or the model's
# context, if shorter) instead of a share of free GPU memory: allocating 60% of an H200 took
# 3 s of the cold start. Longer sequences still run, fewer at a time.
KV_TOKENS_PER_SEQUENCE = 4096


class BuildError(FatalError):
    """The model could not be built; ``tail`` holds the builder's last output lines, if any."""

    reason = "model-build"

    def __init__(self, message: str, tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.tail = tail or []


@dataclass(frozen=True)
class ModelSummary:
    """What a built folder holds, from its ``genai_config.json`` and its files."""

    path: Path
    model_type: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    context_length: int
    vocab_size: int
    eos_token_id: Any
    files: tuple[tuple[str, int], ...]
    chat_template: bool

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


# ---- what the installed builder supports ---------------------------------------------------


def builder_source() -> Path | None:
    """The installed builder's ``builder.py``, found without importing it (it imports torch)."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    return path if path.is_file() else None


@cache
def supported_architectures(source: Path | None = None) -> frozenset[str]:
    """Every ``config.architectures[0] == "..."`` the builder's ``create_model`` dispatches on.

    Empty when the source cannot be read or has no such dispatch (a new builder layout).
    """
    source = source or builder_source()
    if source is None:
        return frozenset()
    names: set[str] = set()
    for func in ast.walk(ast.parse(source.read_text("utf-8"))):
        if not isinstance(func, ast.FunctionDef) or func.name != "create_model":
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Compare) and _is_architectures_item(node.left):
                names.update(
                    c.value
                    for c in node.comparators
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                )
    return frozenset(names)


def _is_architectures_item(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "architectures"
    )


_COMBINATIONS = re.compile(r"Valid precision \+ execution provider combinations are: ([^\"\n]+)")


@cache
def valid_combinations(source: Path | None = None) -> frozenset[tuple[str, str]]:
    """The ``(precision, device)`` pairs the builder lists as valid, lower-cased."""
    source = source or builder_source()
    if source is None:
        return frozenset()
    match = _COMBINATIONS.search(source.read_text("utf-8"))
    if match is None:
        return frozenset()
    pairs = (item.strip().lower().split() for item in match[1].split(","))
    return frozenset((p[0], p[1]) for p in pairs if len(p) == 2)


# ---- checks before the build ---------------------------------------------------------------


def read_config(src: Path) -> dict[str, Any]:
    """``src/config.json``, the Hugging Face model config; a clear refusal if it is not one."""
    if not src.is_dir():
        raise BuildError(f"{src} is not a folder (expected a Hugging Face model folder)")
    path = src / "config.json"
    if not path.is_file():
        raise BuildError(
            f"{src} has no config.json, so it is not a Hugging Face model folder "
            "(expected config.json, the weights and the tokenizer files)"
        )
    try:
        config = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BuildError(f"{path} is not valid JSON: {exc}") from exc
    return config if isinstance(config, dict) else {}


def read_architecture(src: Path) -> str:
    """The first of ``config.json``'s ``architectures``, which is what the builder dispatches on."""
    architectures = read_config(src).get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise BuildError(
            f"{src / 'config.json'} names no architectures, so the builder cannot pick one"
        )
    return str(architectures[0])


def check_build(
    src: Path, precision: str, device: str, extra_options: Mapping[str, str], progress: Progress
) -> str:
    """Refuse, before anything runs, a build the builder cannot do; the architecture if not."""
    if precision not in PRECISIONS:
        raise BuildError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise BuildError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    for key in extra_options:
        if not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise BuildError(f"extra option {key!r}: expected KEY=VALUE with a plain KEY")
    arch = read_architecture(src)
    if not any(next(src.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise BuildError(f"{src} has no weights ({', '.join(WEIGHT_PATTERNS)})")
    known = supported_architectures()
    config_only = extra_options.get("config_only", "").lower() in ("1", "true")
    if not known:
        progress("note: could not read the builder's architecture list; the builder decides")
    elif arch not in known and not config_only:
        raise BuildError(
            f"{src}: architecture {arch} is not one the installed onnxruntime-genai model "
            f"builder can build. It builds: {', '.join(sorted(known))}"
        )
    combos = valid_combinations()
    if not combos:
        progress("note: could not read the builder's precision/device list; the builder decides")
    elif (precision, device) not in combos:
        fits = sorted(p for p, d in combos if d == device and p in PRECISIONS)
        raise BuildError(
            f"precision {precision} on {device} is not a combination the builder supports; "
            f"for {device} use one of: {', '.join(fits) or 'none'}"
        )
    missing = [name for name in BUILDER_REQUIRES if importlib.util.find_spec(name) is None]
    if missing:
        raise BuildError(
            f"building a model needs {', '.join(missing)} (not installed). Install the "
            f"build dependencies: {TRAIN_EXTRA}"
        )
    return arch


# ---- the build -----------------------------------------------------------------------------


def with_engine_defaults(
    src: Path, precision: str, device: str, extra: Mapping[str, str]
) -> dict[str, str]:
    """``extra`` plus :data:`ENGINE_DEFAULTS` for a CUDA fp16 build (what ``extra`` sets wins).

    The paged block size follows the FlashAttention tile for the model's head size (the
    builder's note: 256 up to 64, 128 up to 128, else 64); ``num_blocks`` holds
    ``max_batch_size`` sequences of :data:`KV_TOKENS_PER_SEQUENCE` tokens.
    """
    options = dict(extra)
    paged = options.get("use_paged_attention", "true").lower() not in ("0", "false")
    if device != "cuda" or precision != "fp16" or not paged or "config_only" in options:
        return options
    options = ENGINE_DEFAULTS | options
    config = read_config(src)
    hidden = int(config.get("hidden_size", 0))
    heads = int(config.get("num_attention_heads", 0)) or 1
    head_size = int(config.get("head_dim") or hidden // heads)
    tile = 256 if head_size <= 64 else 128 if head_size <= 128 else 64
    options.setdefault("paged_block_size", str(tile))
    if "num_blocks" not in options and "gpu_utilization_factor" not in options:
        context = int(config.get("max_position_embeddings") or KV_TOKENS_PER_SEQUENCE)
        tokens = int(options["max_batch_size"]) * min(context, KV_TOKENS_PER_SEQUENCE)
        block = int(options["paged_block_size"])
        options["num_blocks"] = str(-(-tokens // block))
    return options


def builder_command(
    src: Path, out: Path, *, cache_dir: Path, precision: str, device: str, extra: Mapping[str, str]
) -> list[str]:
    """The builder's command line, run with this interpreter."""
    cmd = [sys.executable, "-m", BUILDER_MODULE, "-i", str(src), "-o", str(out)]
    cmd += ["-p", precision, "-e", device, "-c", str(cache_dir)]
    if extra:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    return cmd


def build_model(  # noqa: PLR0917 - the documented call: what, where, how, then the callback
    src: Path,
    out: Path,
    precision: str,
    device: str,
    extra_options: dict[str, str],
    progress: Progress,
) -> Path:
    """Build ``src`` (a Hugging Face folder) into ``out`` for the compute stage; returns ``out``.

    ``out`` must be missing, empty, or a model folder from an earlier build (it is replaced
    only once the new build has succeeded). Raises :class:`BuildError`.
    """
    src, out = src.resolve(), out.resolve()
    arch = check_build(src, precision, device, extra_options, progress)
    if out.exists() and any(out.iterdir()) and not (out / "genai_config.json").exists():
        raise BuildError(f"{out} is not empty and not a model folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    progress(f"building {arch} from {src} ({precision}, {device})")
    defaults = with_engine_defaults(src, precision, device, extra_options)
    added = {k: v for k, v in defaults.items() if k not in extra_options}
    if added:
        progress("engine options: " + " ".join(f"{k}={v}" for k, v in added.items()))
    extra_options = defaults
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        built = scratch / "model"
        cmd = builder_command(
            src,
            built,
            cache_dir=scratch / "cache",
            precision=precision,
            device=device,
            extra=extra_options,
        )
        _run_builder(cmd, progress)
        if not (built / "genai_config.json").is_file():
            raise BuildError(f"the builder finished but wrote no genai_config.json in {built}")
        _copy_tokenizer(src, built, progress)
        summarize(built)  # it must load before it replaces anything
        if out.exists():
            shutil.rmtree(out)
        built.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    progress(f"built {out}")
    return out


def _run_builder(cmd: list[str], progress: Progress) -> None:
    progress("$ " + " ".join(["python", *cmd[1:]]))
    env = dict(os.environ)
    # A local folder needs no download; tqdm's carriage returns become lines (text mode).
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            tail.append(line)
            log.debug("builder: %s", line)
            progress(line)
        code = proc.wait()
    if code != 0:
        hint = ""
        if any("No module named" in line for line in tail):
            hint = f" (a build dependency is missing: {TRAIN_EXTRA})"
        raise BuildError(f"the model builder failed (exit {code}){hint}", list(tail))


def _copy_tokenizer(src: Path, built: Path, progress: Progress) -> None:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, built / name)
    if copied:
        progress(f"copied {', '.join(copied)} from {src}")


# ---- after the build -----------------------------------------------------------------------


def summarize(folder: Path) -> ModelSummary:
    """Read a built folder's ``genai_config.json`` and list its files."""
    path = folder / "genai_config.json"
    if not path.is_file():
        raise BuildError(f"{folder} has no genai_config.json: not a built model folder")
    try:
        model = json.loads(path.read_text("utf-8"))["model"]
        decoder = model.get("decoder", {})
        summary = ModelSummary(
            path=folder,
            model_type=str(model.get("type", "?")),
            layers=int(decoder.get("num_hidden_layers", 0)),
            hidden_size=int(decoder.get("hidden_size", 0)),
            heads=int(decoder.get("num_attention_heads", 0)),
            kv_heads=int(decoder.get("num_key_value_heads", 0)),
            context_length=int(model.get("context_length", 0)),
            vocab_size=int(model.get("vocab_size", 0)),
            eos_token_id=model.get("eos_token_id"),
            files=tuple(
                (p.name, p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file()
            ),
            chat_template=_has_chat_template(folder),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BuildError(f"{path} is not a genai config: {exc}") from exc
    return summary


def _has_chat_template(folder: Path) -> bool:
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):  # missing or unreadable: no template to render
        return False
    return isinstance(config, dict) and isinstance(config.get("chat_template"), str)


def parse_extra_options(items: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` (the CLI's repeated ``--extra-option``) as a dict."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BuildError(f"--extra-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    return options
