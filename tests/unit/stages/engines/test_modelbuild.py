"""``sluice model build``: refusals before the builder runs, and one real build of the demo model.

The refusals run nothing (the builder subprocess is replaced by a failure); the real build runs
onnxruntime-genai's model builder on ``models/demo/hf`` for the CPU at INT8, as
``models/demo/build.py`` does, and asks the result a held-out question.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from models.demo import task
from sluice.cli.main import app
from stages.engines import modelbuild
from stages.engines.modelbuild import BuildError, build_model
from stages.text import TextModel
from tests.paths import REPO_ROOT

DEMO = REPO_ROOT / "models" / "demo"
HF = DEMO / "hf"


def hf_folder(tmp_path: Path, architecture: str = "Qwen2ForCausalLM") -> Path:
    """A copy of the demo's Hugging Face folder with ``architectures`` replaced."""
    src = tmp_path / "hf"
    shutil.copytree(HF, src)
    config = json.loads((src / "config.json").read_text("utf-8"))
    config["architectures"] = [architecture]
    (src / "config.json").write_text(json.dumps(config), "utf-8")
    return src


@pytest.fixture
def no_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to start the builder fails the test: refusals come first."""

    def popen(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the builder was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", popen)


@pytest.fixture
def build_deps_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """The train extra looks installed, so checks after the dependency check are reached
    without torch (``no_builder`` still fails any attempt to start the builder)."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        if name in modelbuild.BUILDER_REQUIRES:
            return importlib.machinery.ModuleSpec(name, None)
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_supported_lists_are_read_from_the_installed_builder() -> None:
    known = modelbuild.supported_architectures()
    assert {"Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM"} <= known
    assert "NotAModelForCausalLM" not in known
    combos = modelbuild.valid_combinations()
    assert {("int8", "cpu"), ("int4", "cpu"), ("fp32", "cpu"), ("fp16", "cuda")} <= combos
    assert ("fp16", "cpu") not in combos


@pytest.mark.usefixtures("no_builder")
def test_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    src = tmp_path / "fake"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["NotAModelForCausalLM"]}))
    (src / "model.safetensors").write_bytes(b"")
    lines: list[str] = []
    with pytest.raises(BuildError, match="NotAModelForCausalLM is not one") as info:
        build_model(src, tmp_path / "out", "int8", "cpu", {}, lines.append)
    assert "Qwen2ForCausalLM" in str(info.value)  # it says what it can build
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("no_builder")
def test_refuses_a_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"no config\.json"):
        build_model(tmp_path, tmp_path / "out", "int8", "cpu", {}, print)
    with pytest.raises(BuildError, match="not a folder"):
        build_model(tmp_path / "missing", tmp_path / "out", "int8", "cpu", {}, print)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BuildError, match="names no architectures"):
        build_model(tmp_path, tmp_path / "out", "int8", "cpu", {}, print)


@pytest.mark.usefixtures("no_builder", "build_deps_present")
def test_refuses_what_the_builder_does_not_build(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"fp16 on cpu is not a combination.*fp32, int4, int8"):
        build_model(HF, tmp_path / "out", "fp16", "cpu", {}, print)
    with pytest.raises(BuildError, match="precision 'int3'"):
        build_model(HF, tmp_path / "out", "int3", "cpu", {}, print)
    with pytest.raises(BuildError, match="device 'tpu'"):
        build_model(HF, tmp_path / "out", "int8", "tpu", {}, print)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not empty and not a model folder"):
        build_model(HF, tmp_path / "out", "int8", "cpu", {}, print)


@pytest.mark.usefixtures("no_builder")
def test_missing_build_dependencies_name_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "torch" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(BuildError, match=r"pip install 'sluice-llm\[train\]'"):
        build_model(HF, tmp_path / "out", "int8", "cpu", {}, print)


@pytest.mark.usefixtures("no_builder")
def test_cli_refuses_with_a_message(tmp_path: Path) -> None:
    src = hf_folder(tmp_path, "NotAModelForCausalLM")
    args = ["model", "build", "--from", str(src), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--precision", "int8", "--device", "cpu"])
    assert result.exit_code == 1
    assert "NotAModelForCausalLM" in result.stderr
    result = CliRunner().invoke(
        app, [*args, "--precision", "int8", "--device", "cpu", "--extra-option", "oops"]
    )
    assert result.exit_code == 1
    assert "KEY=VALUE" in result.stderr


@pytest.mark.tools
def test_builder_failure_keeps_its_last_lines_and_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "genai_config.json").write_text("{}")  # an earlier build, to be kept
    args = ["model", "build", "--from", str(HF), "--out", str(out), "--precision", "int8"]
    args += ["--device", "cpu", "--extra-option", "use_paged_attention=true"]  # CUDA only
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "the model builder failed" in result.stderr
    assert "PagedAttention" in result.stderr  # the builder's own last lines
    assert [p.name for p in out.iterdir()] == ["genai_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no scratch folder left behind


@pytest.mark.tools
def test_builds_the_demo_model_for_cpu_int8(tmp_path: Path) -> None:
    import onnxruntime_genai as og

    lines: list[str] = []
    out = build_model(
        HF, tmp_path / "demo-int8", "int8", "cpu", {"block_size": "128"}, lines.append
    )
    assert out == (tmp_path / "demo-int8").resolve()
    assert any("onnxruntime_genai.models.builder" in line for line in lines)
    assert any("matmul_nbits_quantizer" in line for line in lines)  # streamed, line by line

    summary = modelbuild.summarize(out)
    assert (summary.model_type, summary.layers, summary.context_length) == ("qwen2", 4, 256)
    assert summary.eos_token_id == 258
    assert summary.chat_template  # the source's tokenizer files, not the builder's re-save
    files = dict(summary.files)
    committed = DEMO / "cpu-int8" / "model.onnx.data"
    assert files["model.onnx.data"] == committed.stat().st_size  # as models/demo/build.py made

    text = TextModel.load(out)
    model = og.Model(str(out))
    example = task.held_out(1, seed=2)[0]
    ids = text.encode(text.render([{"role": "user", "content": example.question}]))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 24)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    output: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token in text.eos_token_ids:
            break
        output.append(token)
    assert task.check(example.question, text.decode(output)), text.decode(output)


def test_cuda_fp16_builds_get_the_engine_options() -> None:
    """What og.Engine needs to batch, and the options measured fastest on the H200; what the
    caller passes wins, and a build without paged attention gets none of them."""
    options = modelbuild.with_engine_defaults(HF, "fp16", "cuda", {})
    assert options["use_paged_attention"] == "true"
    assert options["prune_lm_head"] == options["enable_cuda_graph"] == "true"
    assert options["paged_block_size"] == "256"  # the demo's head size is 32
    assert options["num_blocks"] == "128"  # 128 sequences of its 256-token context
    ours = modelbuild.with_engine_defaults(HF, "fp16", "cuda", {"max_batch_size": "64"})
    assert (ours["max_batch_size"], ours["num_blocks"]) == ("64", "64")
    share = modelbuild.with_engine_defaults(HF, "fp16", "cuda", {"gpu_utilization_factor": "0.3"})
    assert "num_blocks" not in share
    assert modelbuild.with_engine_defaults(HF, "int8", "cuda", {}) == {}
    assert modelbuild.with_engine_defaults(HF, "fp16", "cpu", {}) == {}
    off = {"use_paged_attention": "false"}
    assert modelbuild.with_engine_defaults(HF, "fp16", "cuda", off) == off


@pytest.mark.tools
def test_a_cuda_fp16_build_writes_the_engine_options(tmp_path: Path) -> None:
    lines: list[str] = []
    out = build_model(HF, tmp_path / "demo-cuda", "fp16", "cuda", {}, lines.append)
    assert any(line.startswith("engine options: use_paged_attention=true") for line in lines)
    config = json.loads((out / "genai_config.json").read_text())
    assert config["engine"]["dynamic_batching"] == {
        "block_size": 256,
        "max_batch_size": 128,
        "num_blocks": 128,
        "max_scheduled_tokens": 16384,
    }
    decoder = config["model"]["decoder"]
    assert "logits_indices" in decoder["inputs"]  # the pruned LM head
    assert decoder["session_options"]["provider_options"] == [{"cuda": {"enable_cuda_graph": "1"}}]
