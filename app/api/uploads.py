"""POST /datasets: upload a real labelled dataset (an archive of images and a metadata CSV).

The archive streams to a temporary file and then to the object store, never whole in memory;
an ingest job on a worker reads it, checks every row and image, and fills the dataset.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, File, Form, Response, UploadFile, status

from app.api.accepted import accept
from app.api.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from app.api.problems import problem_responses
from app.api.views import job_out
from app.datasets import uploads as upload_service
from app.errors import InvalidField, ProblemError
from app.schemas import CsvFormat, JobOut, Name, OnError, has_control

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=problem_responses(401, 422))


class TooLarge(ProblemError):
    status = 413
    title = "Upload too large"


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses=problem_responses(400, 413),
)
def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    caller: CallerDep,
    background: BackgroundTasks,
    response: Response,
    archive: Annotated[UploadFile, File(description="zip, tar or tar.gz of the images.")],
    metadata: Annotated[
        UploadFile | None, File(description="The CSV; default: metadata.csv in the archive.")
    ] = None,
    name: Annotated[Name | None, Form(max_length=200)] = None,
    csv_format: Annotated[CsvFormat, Form()] = CsvFormat.AUTO,
    file_column: Annotated[Name | None, Form(max_length=200)] = None,
    label_column: Annotated[Name | None, Form(max_length=200)] = None,
    skin_tone_column: Annotated[Name | None, Form(max_length=200)] = None,
    split_column: Annotated[Name | None, Form(max_length=200)] = None,
    on_error: Annotated[OnError, Form()] = OnError.FAIL,
) -> JobOut:
    """Queue the ingest of a real dataset; the job reports every bad row by number."""
    size = archive.size if archive.size is not None else 0
    if size > settings.upload_max_bytes:
        raise TooLarge(
            f"archive: {size:,} bytes is over the limit of {settings.upload_max_bytes:,}"
        )
    if size == 0:
        raise InvalidField("archive: the file is empty", field="archive")
    if archive.filename is not None and has_control(archive.filename):
        raise InvalidField(
            "archive: the file name contains a control character; control characters are "
            "not allowed",
            field="archive",
        )
    params = {
        "archive_name": archive.filename,
        "archive_bytes": size,
        "has_metadata": metadata is not None,
        "csv_format": csv_format.value,
        "file_column": file_column,
        "label_column": label_column,
        "skin_tone_column": skin_tone_column,
        "split_column": split_column,
        "on_error": on_error.value,
    }
    job = upload_service.stage_upload(
        session=session,
        store=store,
        owner=caller,
        name=name or (archive.filename or "upload").rsplit(".", 1)[0][:200],
        archive=archive.file,
        metadata=metadata.file if metadata is not None else None,
        params=params,
    )
    accept(session=session, settings=settings, background=background, response=response,
           job=job, location=f"/jobs/{job.id}")  # fmt: skip
    return job_out(job)
