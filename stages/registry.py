"""Build a stage's handler from settings: what ``sluice run <stage>`` runs."""

from __future__ import annotations

from pipeline.config import Settings
from pipeline.runtime.stage import Handler
from stages.text import TextModel

STAGES = ("preprocess", "compute", "postprocess")


def build_handler(name: str, settings: Settings) -> Handler:
    text = TextModel.load(settings.model_path)
    if name == "preprocess":
        from stages.preprocess import Preprocess

        return Preprocess(settings, text)
    if name == "postprocess":
        from stages.postprocess import Postprocess

        return Postprocess(settings, text)
    if name == "compute":
        from stages.compute import Compute
        from stages.deltas import DeltaPublisher
        from stages.engines.base import Engine, StreamPolicy

        engine: Engine
        stream = StreamPolicy(settings.delta_interval_ms / 1000, settings.delta_tokens)
        if settings.engine == "echo":
            from stages.engines.echo import EchoEngine

            engine = EchoEngine(
                text,
                settings.echo_delay_ms / 1000,
                settings.echo_fault_file,
                oom_file=settings.echo_oom_file,
                oom_chunk=settings.echo_oom_chunk_mb << 20,
                stall_file=settings.echo_stall_file,
                stall_s=settings.engine_stall_s,
                token_delay_s=settings.echo_token_delay_ms / 1000,
                stream=stream,
            )
        else:
            from stages.engines.onnx import OnnxEngine

            engine = OnnxEngine(
                settings.model_path,
                max_batch=settings.engine_max_batch,
                token_budget=settings.engine_token_budget,
                threads=settings.engine_threads,
                stall_s=settings.engine_stall_s,
                mode=settings.engine_mode,
                stream=stream,
            )
        return Compute(settings, engine, text, deltas=DeltaPublisher(settings), cancels=True)
    raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}")
