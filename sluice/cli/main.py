"""The ``sluice`` command line.

Expected failures (no broker, a wrong address, a missing model or file, a bad setting) end a
command with one ``error: …`` line and a non-zero exit (``sluice.cli.errors``); ``--verbose``
shows the traceback instead.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra import local
from pipeline import admin
from pipeline.aio import run_async
from pipeline.config import Settings
from pipeline.logs import setup_logging
from pipeline.observability.crash import CrashReporter
from sluice.cli import client as cli_client
from sluice.cli import cutover as cli_cutover
from sluice.cli import doctor as cli_doctor
from sluice.cli import ops as cli_ops
from sluice.cli.errors import SluiceGroup, fail
from sluice.cli.lognoise import quiet_startup_noise
from sluice.cli.replay import register as register_replay
from sluice.settings import load_settings

app = typer.Typer(
    cls=SluiceGroup,
    help="Sluice: LLM serving as an event-driven pipeline over Kafka.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
topics_app = typer.Typer(help="Create and inspect Sluice topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
cli_ops.register(app)
cli_doctor.register(app)
cli_cutover.register(app)
register_replay(app)
app.command("send")(cli_client.send)
app.command("infer")(cli_client.infer)
console = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    return load_settings()


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logs; tracebacks for every failure.")
    ] = False,
) -> None:
    setup_logging(verbose)
    if not verbose:
        quiet_startup_noise()


@app.command()
def up(
    minio: Annotated[bool, typer.Option(help="Start MinIO too.")] = False,
    port: Annotated[int, typer.Option(help="Broker port (0: a free one).")] = 0,
) -> None:
    """Start the local Kafka broker (KRaft) and optionally MinIO; idempotent.

    With --minio it prints MinIO's credentials and the environment that points the archiver
    (and replay / restore) at a bucket there.
    """
    with console.status("starting local services (first run fetches Kafka / builds MinIO)"):
        st = local.up(minio=minio, kafka_port=port)
    if st.kafka:
        console.print(f"kafka  [green]{st.kafka.address}[/] (log {st.kafka.log_path})")
        console.print(f"       export SLUICE_BOOTSTRAP_SERVERS={st.kafka.address}")
    if st.minio:
        creds = local.minio_credentials()
        console.print(
            f"minio  [green]http://{st.minio.address}[/] (log {st.minio.log_path})\n"
            f"       user {creds.access_key}, password {creds.secret_key} (local use only)\n"
            "       to archive there (sluice run archiver; replay and restore read it too):"
        )
        for line in local.minio_env(st.minio):
            console.print(f"       export {line}", highlight=False, soft_wrap=True)


@app.command()
def down() -> None:
    """Stop the local services that ``sluice up`` started."""
    stopped = local.down()
    console.print("\n".join(f"stopped {s}" for s in stopped) or "nothing was running")


@app.command()
def demo() -> None:
    """The whole pipeline on one machine: broker, topics, three stages, sample prompts."""
    from sluice.demo import run_demo

    bad = run_demo(console, _settings())
    if bad:
        raise fail(f"{bad} answers were wrong or missing", 1)


@app.command()
def run(
    stage: Annotated[
        str,
        typer.Argument(help="preprocess | compute | postprocess | archiver | gateway | batcher"),
    ],
) -> None:
    """Run one stage until SIGTERM/SIGINT (graceful: finish in-flight work, commit, leave).

    A fatal error, an engine death or an unhandled exception writes a crash report to
    <state_dir>/crash/ before the process exits non-zero (see ``sluice doctor``)."""
    from pipeline.observability import crash
    from stages.registry import STAGES

    known = [*STAGES, "archiver", "gateway", "batcher"]
    if stage not in known:
        raise fail(f"unknown stage {stage!r}; one of: {', '.join(known)}")
    settings = _settings()
    _preflight(settings)
    reporter = crash.install(settings, stage)
    try:
        _run_stage(stage, settings, reporter)
    except Exception as exc:
        reporter.write(None, exc)  # never hides exc: the CLI's error mapping still reports it
        raise
    finally:
        reporter.close()


def _run_stage(stage: str, settings: Settings, reporter: CrashReporter) -> None:
    from pipeline.runtime.runner import run_stage
    from stages.registry import build_handler

    if stage == "gateway":
        from stages.gateway import run_gateway

        run_gateway(settings)
    elif stage == "archiver":
        from sluice.cli.replay import run_archiver_command

        run_archiver_command(settings)
    elif stage == "batcher":
        from stages.batcher import run_batcher

        run_async(run_batcher(settings))
    else:
        handler = build_handler(stage, settings)
        reporter.add_inflight(getattr(getattr(handler, "engine", None), "inflight", None))
        run_async(run_stage(settings, handler))


def _preflight(settings: Settings) -> None:
    """The broker answers and the flow's topics exist, or one line now: not a traceback from a
    server's start-up, and not a worker started only to die."""
    missing = run_async(admin.missing_topics(settings, settings.topics.main_topics()))
    if missing:
        raise fail(
            f"topics missing: {', '.join(missing)} (create them with: sluice topics create)", 3
        )


@app.command()
def scale(
    stages: Annotated[
        list[str] | None, typer.Option("--stage", help="Stages to run (default: all three).")
    ] = None,
    cpu_affinity: Annotated[bool, typer.Option(help="Pin each worker to one CPU.")] = False,
    lag_threshold: Annotated[
        int | None, typer.Option(help="Lag per worker (default: per stage policy).")
    ] = None,
    max_workers: Annotated[int | None, typer.Option(help="Upper bound per stage.")] = None,
) -> None:
    """Run the stages as worker processes and scale each on its consumer-group lag."""
    import dataclasses
    import signal
    import tempfile
    from pathlib import Path

    from pipeline.scaling import DEFAULT_POLICIES
    from sluice.supervisor import Supervisor

    chosen = set(stages or [p.stage for p in DEFAULT_POLICIES])
    unknown = chosen - {p.stage for p in DEFAULT_POLICIES}
    if unknown:
        raise fail(f"unknown stage(s): {', '.join(sorted(unknown))}")
    policies = [
        dataclasses.replace(
            p,
            lag_threshold=lag_threshold or p.lag_threshold,
            max_workers=max_workers or p.max_workers,
        )
        for p in DEFAULT_POLICIES
        if p.stage in chosen
    ]
    settings = _settings()
    _preflight(settings)
    log_dir = Path(tempfile.mkdtemp(prefix="sluice-scale-"))
    console.print(f"worker logs in {log_dir}; SIGTERM or Ctrl-C stops every worker cleanly")
    supervisor = Supervisor(settings, policies, log_dir, cpu_affinity=cpu_affinity)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.request_stop)
        await supervisor.run()

    run_async(main())


@topics_app.command("create")
def topics_create(
    partitions: Annotated[int | None, typer.Option(help="Partitions per topic.")] = None,
) -> None:
    """Create every Sluice topic (idempotent): the flow's, each with a .DLT twin, and the
    replies and control topics.

    Returns once every partition has a leader and the stages' consumer groups have a
    coordinator, so stages started next join without retries.
    """
    settings = _settings()
    created, existing = asyncio.run(admin.create_topics(settings, partitions=partitions))
    asyncio.run(admin.wait_for_coordinator(settings, stage_groups(settings)))
    for name in created:
        console.print(f"created  {name}")
    for name in existing:
        console.print(f"exists   {name}")


def stage_groups(settings: Settings) -> list[str]:
    """The consumer groups of every stage that reads a topic."""
    from stages.registry import STAGES

    return [settings.group_id(stage) for stage in (*STAGES, "archiver")]


@topics_app.command("list")
def topics_list() -> None:
    """Every Sluice topic with its partitions and end offsets."""
    topics_list_for(_settings())


def topics_list_for(settings: Settings) -> None:
    infos = asyncio.run(admin.describe_topics(settings))
    table = Table(title=f"topics on {settings.bootstrap_servers}")
    table.add_column("topic")
    table.add_column("partitions", justify="right")
    table.add_column("messages", justify="right")
    table.add_column("end offsets")
    for info in infos:
        offsets = " ".join(f"{p}:{o}" for p, o in sorted(info.end_offsets.items()))
        table.add_row(info.name, str(info.partitions), str(info.messages), offsets)
    console.print(table)
    missing = set(settings.topics.all_topics()) - {i.name for i in infos}
    if missing:
        raise fail(f"missing topics: {', '.join(sorted(missing))} (run: sluice topics create)", 1)


model_app = typer.Typer(help="Build model folders for the compute stage.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("build")
def model_build(
    src: Annotated[
        str, typer.Option("--from", help="Hugging Face model folder (config.json, weights).")
    ],
    out: Annotated[str, typer.Option("--out", help="Folder to write the built model to.")],
    precision: Annotated[str, typer.Option(help="fp16 | int8 | int4 | fp32")],
    device: Annotated[str, typer.Option(help="cuda | cpu")],
    extra_option: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE for the builder's --extra_options (repeatable)."),
    ] = None,
) -> None:
    """Build an ONNX model folder with onnxruntime-genai's model builder (train extra).

    CUDA fp16 builds get og.Engine's continuous-batching options (paged attention, pruned LM
    head, CUDA graphs, a pinned KV cache); --extra-option overrides them, and
    --extra-option use_paged_attention=false drops them.
    """
    from pathlib import Path

    from stages.engines import modelbuild

    title = f"building {src} ({precision}, {device})"
    try:
        extras = modelbuild.parse_extra_options(extra_option or [])
        with console.status(title) as status:

            def progress(line: str) -> None:
                status.update(f"{escape(title)}\n[dim]{escape(line[: console.width - 4])}[/]")

            built = modelbuild.build_model(
                Path(src), Path(out), precision, device, extras, progress
            )
    except modelbuild.BuildError as exc:
        for line in exc.tail:
            err.print(escape(line), highlight=False, soft_wrap=True)
        raise fail(str(exc), 1) from exc
    summary = modelbuild.summarize(built)
    table = Table(title=f"{summary.path}", show_header=False)
    table.add_row("type", summary.model_type)
    table.add_row("layers", str(summary.layers))
    shape = f"{summary.hidden_size} / {summary.heads} / {summary.kv_heads}"
    table.add_row("hidden / heads / kv heads", shape)
    table.add_row("context length", str(summary.context_length))
    table.add_row("vocab / eos", f"{summary.vocab_size} / {summary.eos_token_id}")
    table.add_row("chat template", "yes" if summary.chat_template else "[red]missing[/]")
    for name, size in [*summary.files, ("total", summary.total_bytes)]:
        table.add_row(name, f"{size:,} B" if size < 2**20 else f"{size / 2**20:,.1f} MiB")
    console.print(table)


if __name__ == "__main__":
    app()
