"""The FastAPI application. `uvicorn app.main:app` serves it with settings from the
environment; tests build their own with `create_app(settings)`. No torch imports here."""

from __future__ import annotations

import gc
import logging

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import (
    catalog,
    datasets,
    evaluations,
    experiments,
    exports,
    files,
    finetunes,
    health,
    jobs,
    problems,
    uploads,
)
from app.config import Settings, get_settings
from app.storage import make_store


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for `settings` (default: the environment's)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="synthderm",
        version="0.1.0",
        description="Synthetic dermatology training data from latent diffusion models.",
    )
    app.state.settings = settings
    app.state.store = make_store(settings)
    problems.install(app)
    routers = (
        health, jobs, datasets, uploads, exports, experiments, finetunes, evaluations, catalog,
        files,
    )  # fmt: skip
    for module in routers:
        app.include_router(module.router)
    if settings.gc_freeze_after_requests:
        app.add_middleware(FreezeWhenWarm, after=settings.gc_freeze_after_requests)
    return app


class FreezeWhenWarm:
    """Plain ASGI middleware: after `after` requests, one gc.collect() and gc.freeze().

    A warm API process holds about 230,000 long-lived objects (modules, the ORM's mappers and
    compiled statements, pydantic's validators); each full collection walked them all, 20-260
    ms during which every request in flight waited (the p99 of POST /jobs under load,
    bench/RESULTS.md). Frozen, they are never walked again. Frozen too early (at import), the
    caches the first requests build would still be walked."""

    def __init__(self, app: ASGIApp, *, after: int) -> None:
        self.app = app
        self.after = after
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
        if scope["type"] != "http" or self.served > self.after:
            return
        self.served += 1
        if self.served == self.after:
            gc.collect()
            gc.freeze()
            logging.getLogger(__name__).info(
                "warm after %s requests: %s objects frozen out of garbage collection",
                self.after,
                gc.get_freeze_count(),
            )


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` builds the app on first access, not on import.
    if name == "app":
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
