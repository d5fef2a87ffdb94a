"""Build a stage's handler from settings: what ``sluice run <stage>`` runs."""

from __future__ import annotations

from pipeline.config import Settings
from pipeline.stage import Handler
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
        from stages.engines.echo import EchoEngine

        if settings.engine != "echo":
            raise ValueError(f"engine {settings.engine!r} is not available yet; use echo")
        engine = EchoEngine(text, settings.echo_delay_ms / 1000, settings.echo_fault_file)
        return Compute(settings, engine)
    raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}")
