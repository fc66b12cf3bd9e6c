"""The FastAPI application. `uvicorn app.main:app` serves it with settings from the
environment; tests build their own with `create_app(settings)`. No torch imports here."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from app.api import (
    catalog,
    datasets,
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
    routers = (health, jobs, datasets, uploads, exports, experiments, finetunes, catalog, files)
    for module in routers:
        app.include_router(module.router)
    return app


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
