"""`synthderm serve` and `synthderm run`: the API alone, or the embedded default that `make run`
starts: it migrates, then runs the API and a Celery worker as child processes and stops both
cleanly on Ctrl-C (SIGTERM, a grace period, then SIGKILL).

A process supervisor only: the database work is admin's (`upgrade_database`), the serving is
the children's; it must not import the app, SQLAlchemy or torch itself, and no child may
outlive it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from app.cli.admin import TINY_MODELS, build_tiny_models, upgrade_database
from app.cli.common import ROOT, console
from app.config import get_settings


def serve() -> None:
    """Serve the API only (uvicorn), on api_host:api_port."""
    import uvicorn

    settings = get_settings()
    uvicorn.run("app.main:app", host=settings.api_host, port=settings.api_port)


def _child_setup() -> None:
    """In the child, before exec: its own process group (so a terminal's Ctrl-C reaches only
    the supervisor, which stops the children in order), and on Linux a SIGTERM when the
    supervisor dies, even by SIGKILL, so no child outlives it."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Supervisor:
    """Child processes in their own process groups; stopped together, none left behind."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def start(self, name: str, argv: list[str]) -> None:
        console.print(f"starting {name}: {' '.join(argv)}")
        self.children[name] = subprocess.Popen(argv, cwd=ROOT, preexec_fn=_child_setup)

    def _signal_all(self, sig: int) -> None:
        for child in self.children.values():
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, sig)

    def stop(self) -> None:
        """SIGTERM every group, wait the grace period, SIGKILL what remains."""
        if self.stopping:
            return
        self.stopping = True
        console.print(f"stopping (grace {self.grace_s:.0f}s for running tasks)...")
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(c.poll() is None for c in self.children.values()):
            time.sleep(0.1)
        self._signal_all(signal.SIGKILL)
        for child in self.children.values():
            child.wait()
        # the groups may hold grandchildren (e.g. pool processes): make sure they are gone
        self._signal_all(signal.SIGKILL)

    def wait(self) -> int:
        """Block until a child exits or a signal asks to stop; returns the exit code."""
        while not self.stopping:
            for name, child in self.children.items():
                code = child.poll()
                if code is not None:
                    console.print(f"[red]{name} exited with {code}; stopping the rest[/red]")
                    self.stop()
                    return code or 1
            time.sleep(0.2)
        return 0


def run(
    with_worker: Annotated[bool, typer.Option(help="Also run a Celery worker.")] = True,
    build_tiny: Annotated[bool, typer.Option(help="Build the tiny generators if missing.")] = True,
) -> None:
    """Migrate, then serve the API and a worker until Ctrl-C (the embedded default)."""
    logging.basicConfig(level=logging.INFO)
    settings = get_settings()
    if build_tiny and settings.default_model in TINY_MODELS:
        console.print(f"making sure the tiny generators are in {settings.resolved_models_dir}...")
        build_tiny_models(settings.resolved_models_dir)
    upgrade_database(settings)
    supervisor = Supervisor(settings.shutdown_grace_s)

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor.start(
        "api",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            settings.api_host,
            "--port",
            str(settings.api_port),
        ],
    )
    if with_worker:
        supervisor.start(
            "worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                "worker",
                "-Q",
                "gpu,train",
                "--pool",
                "solo",
                "--concurrency",
                "1",
                "-n",
                "embedded@%h",
                "--loglevel",
                "INFO",
            ],
        )
    console.print(f"synthderm is up: {settings.public_base_url} (Ctrl-C stops it)")
    code = supervisor.wait()
    raise typer.Exit(code)
