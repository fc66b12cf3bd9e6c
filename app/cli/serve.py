"""`synthderm serve` and `synthderm run`: the API alone, or the embedded default that `make run`
starts: it migrates, then runs the API and a Celery worker as child processes, restarts the
worker when it dies (with a backoff, up to a limit of crashes), and stops both cleanly on
Ctrl-C (SIGTERM, a grace period, then SIGKILL).

A process supervisor only: the database work is admin's (`upgrade_database`), the serving is
the children's; it must not import the app, SQLAlchemy or torch itself, and no child may
outlive it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from app.cli.admin import build_tiny_models, upgrade_database
from app.cli.common import ROOT, console
from app.config import get_settings


def serve() -> None:
    """Serve the API only (uvicorn), on api_host:api_port."""
    import uvicorn

    settings = get_settings()
    uvicorn.run("app.main:app", host=settings.api_host, port=settings.api_port)


def _child_setup(supervisor_pid: int) -> None:
    """In the child, before exec: its own process group (so a terminal's Ctrl-C reaches only
    the supervisor, which stops the children in order), and on Linux a SIGTERM when the
    supervisor dies, even by SIGKILL, so no child outlives it."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != supervisor_pid:  # it died before the prctl: no signal will come
            os._exit(1)


class Supervisor:
    """Child processes in their own process groups; stopped together, none left behind.

    A child started with `restart=True` (the worker) is restarted when it dies, after a backoff
    that doubles from `backoff_s` up to `max_backoff_s`; after `max_crashes` deaths within
    `crash_window_s` the supervisor gives up and stops everything. Any other child (the API)
    dying stops everything at once. Signals only ask for a stop (`request_stop`); `wait` does
    it, so a stop never races a restart."""

    def __init__(
        self,
        grace_s: float,
        *,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_crashes: int = 5,
        crash_window_s: float = 600.0,
    ) -> None:
        self.grace_s = grace_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_crashes = max_crashes
        self.crash_window_s = crash_window_s
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.argvs: dict[str, list[str]] = {}
        self.restartable: set[str] = set()
        self.crashes: dict[str, list[float]] = {}
        self.restart_at: dict[str, float] = {}
        self.stopping = False
        self.stop_requested = False

    def start(self, name: str, argv: list[str], *, restart: bool = False) -> None:
        self.argvs[name] = argv
        if restart:
            self.restartable.add(name)
        self._spawn(name)

    def _spawn(self, name: str) -> None:
        setup = functools.partial(_child_setup, os.getpid())
        child = subprocess.Popen(self.argvs[name], cwd=ROOT, preexec_fn=setup)
        self.children[name] = child
        console.print(f"started {name} (pid {child.pid}): {' '.join(self.argvs[name])}")

    def request_stop(self) -> None:
        """What a signal handler calls: `wait` stops the children on its next turn."""
        self.stop_requested = True

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
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)

    def _crashed(self, name: str, code: int) -> int | None:
        """A restartable child died: schedule its restart, or give up (returns the exit
        code) after too many crashes within the window."""
        child = self.children[name]
        with contextlib.suppress(ProcessLookupError):  # what its group left behind
            os.killpg(child.pid, signal.SIGKILL)
        now = time.monotonic()
        recent = [t for t in self.crashes.get(name, []) if now - t < self.crash_window_s]
        recent.append(now)
        self.crashes[name] = recent
        window = f"{self.crash_window_s / 60:g} min"
        if len(recent) >= self.max_crashes:
            console.print(
                f"[bold red]GIVING UP on {name}: it exited with {code}, crash {len(recent)} "
                f"within {window} (limit {self.max_crashes}); stopping everything[/bold red]"
            )
            self.stop()
            return 1
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (len(recent) - 1))
        console.print(
            f"[red]{name} (pid {child.pid}) exited with {code}; restarting {name} in "
            f"{delay:g}s (crash {len(recent)} of {self.max_crashes} allowed within "
            f"{window})[/red]"
        )
        self.restart_at[name] = now + delay
        return None

    def wait(self) -> int:
        """Block until a stop is asked for (returns 0), a child that is not restarted exits,
        or a restarted one crashes too often (returns non-zero)."""
        while not self.stopping:
            if self.stop_requested:
                self.stop()
                return 0
            for name, child in list(self.children.items()):
                if name in self.restart_at:
                    if time.monotonic() >= self.restart_at[name]:
                        del self.restart_at[name]
                        console.print(f"restarting {name}...")
                        self._spawn(name)
                    continue
                code = child.poll()
                if code is None:
                    continue
                if name not in self.restartable:
                    console.print(f"[red]{name} exited with {code}; stopping the rest[/red]")
                    self.stop()
                    return code or 1
                given_up = self._crashed(name, code)
                if given_up is not None:
                    return given_up
            time.sleep(0.2)
        return 0


def run(
    with_worker: Annotated[
        bool, typer.Option(help="Also run the Celery workers (jobs, and webhook deliveries).")
    ] = True,
    build_tiny: Annotated[bool, typer.Option(help="Build the tiny generators if missing.")] = True,
    max_worker_crashes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Give up (stop everything, exit 1) after this many worker crashes "
            "within 10 minutes.",
        ),
    ] = 5,
) -> None:
    """Migrate, then serve the API and a worker until Ctrl-C (the embedded default).

    A worker that dies (a crash, the OOM killer) is restarted after 1, 2, 4 ... up to 30
    seconds, each restart logged with its exit code, while the API stays up; after
    --max-worker-crashes crashes within 10 minutes it gives up: it says so, stops everything
    and exits 1. The API dying stops everything. Ctrl-C or SIGTERM stops both: SIGTERM, the
    grace period (SYNTHDERM_SHUTDOWN_GRACE_S) for running tasks, then SIGKILL.
    """
    logging.basicConfig(level=logging.INFO)
    settings = get_settings()
    # the tiny generators are the fastest to try (the default is the project's own model)
    if build_tiny:
        console.print(f"making sure the tiny generators are in {settings.resolved_models_dir}...")
        build_tiny_models(settings.resolved_models_dir)
    upgrade_database(settings)
    supervisor = Supervisor(settings.shutdown_grace_s, max_crashes=max_worker_crashes)

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.request_stop()

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
        from app.broker import WEBHOOK_QUEUE  # here: the client commands load no SQLAlchemy

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
            restart=True,
        )
        # webhook deliveries on their own small worker: a job's last event never waits
        # behind a generation chunk, and a receiver that never answers holds one thread
        supervisor.start(
            "webhooks",
            [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
             "-Q", WEBHOOK_QUEUE, "--pool", "threads", "--concurrency", "4",
             "-n", "webhooks@%h", "--loglevel", "INFO"],
            restart=True,
        )  # fmt: skip
    console.print(f"synthderm is up: {settings.public_base_url} (Ctrl-C stops it)")
    code = supervisor.wait()
    raise typer.Exit(code)
