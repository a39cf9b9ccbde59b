"""HTTP API of the extension, under /ti-trainer/v1, listed in the host's OpenAPI page (/docs).

Mounted only when the host's own API is on (--api or --nowebui), and behind --api-auth when that
is set, like /sdapi/v1. A run started here holds the host's GPU queue lock, as one from the tab does.
"""

# No "from __future__ import annotations": FastAPI reads the route functions' annotations at runtime,
# and those name classes imported inside mount().
import base64
import secrets
from typing import Any

from ..config import TrainConfig
from ..errors import TIError
from . import gpu_queue, registry, runner, settings

PREFIX = "/ti-trainer/v1"


def mount(app) -> None:
    if getattr(app.state, "ti_trainer_mounted", False):  # on_app_started fires again after every UI reload
        return
    app.state.ti_trainer_mounted = True
    from fastapi import APIRouter, Body, Depends, HTTPException, Query
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    credentials = settings.api_credentials()
    dependencies = []
    if credentials:
        basic = HTTPBasic()

        def auth(creds: HTTPBasicCredentials = Depends(basic)) -> None:
            expected = credentials.get(creds.username)
            if expected is None or not secrets.compare_digest(creds.password, expected):
                raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

        dependencies = [Depends(auth)]
    router = APIRouter(prefix=PREFIX, tags=["TI Trainer"], dependencies=dependencies)

    @router.post("/train", status_code=202, summary="Start a training run on the loaded checkpoint")
    def train(config: dict[str, Any] = Body(..., description="TrainConfig keys (see the README); model stays empty"),
              resume: bool = Query(False, description="continue the run from its last checkpoint")):
        try:
            job, cfg = _prepare(config, resume)
        except TIError as exc:
            raise HTTPException(422, str(exc)) from None
        runner.start(job, cfg, resume=resume)
        return job.status()

    @router.get("/status", summary="Status of a run (default: the latest)")
    def status(run_id: str = Query("", description="a run_id from /train or /runs; empty = the latest run"),
               preview: bool = Query(False, description="include the last preview as a base64 PNG")):
        job = _find(run_id)
        if job is None:
            raise HTTPException(404, f"no run {run_id!r}" if run_id else "no run has been started")
        out = job.status()
        if preview and job.previews:
            out["last_preview_png"] = base64.b64encode(job.previews[-1][1].read_bytes()).decode("ascii")
        return out

    @router.post("/stop", summary="Stop the active run after its current step (it is saved)")
    def stop():
        job = runner.current_job()
        if job is None:
            raise HTTPException(409, "no training run is active")
        job.request_stop()
        return job.status()

    @router.get("/runs", summary="Runs of this session, and run folders on disk that can be resumed")
    def runs():
        return {"session": [j.status() for j in list(runner.JOBS.values())], "on_disk": _runs_on_disk()}

    @router.post("/create", summary="Create a step-0 embedding from init text in the embeddings folder")
    def create(config: dict[str, Any] = Body(..., description="name, init_text, num_vectors, overwrite")):
        try:
            cfg = TrainConfig.from_dict(config)
            with gpu_queue.gpu_job("task(ti-trainer-create)"):
                path = runner.create_embedding(cfg)
        except TIError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"path": str(path), "name": cfg.name}

    @router.post("/selfcheck", summary="Check the adapter on the loaded checkpoint (conditioning and gradients)")
    def selfcheck(init_text: str = Query("a photo", description="words whose token vectors stand in for the token"),
                  prompt: str = Query("a {} on a table", description="a prompt; {} marks the token"),
                  weights: bool = Query(False, description="also a digest of every weight of the loaded checkpoint "
                                        "(about a second per GB): equal before and after a run = left bit-identical")):
        try:
            with gpu_queue.gpu_job("task(ti-trainer-selfcheck)"):
                return registry.current_host().self_check(init_text, prompt, weights=weights)
        except TIError as exc:
            raise HTTPException(409, str(exc)) from None

    app.include_router(router)


def _prepare(config: dict[str, Any], resume: bool):
    cfg = runner.resolve(runner.request_config(config, resume=resume), resume=resume)
    return runner.new_job(cfg), cfg


def _find(run_id: str):
    jobs = list(runner.JOBS.values())
    if not run_id:
        return jobs[-1] if jobs else None
    return runner.JOBS.get(run_id)


def _runs_on_disk() -> list[dict[str, Any]]:
    return runner.runs_on_disk()

