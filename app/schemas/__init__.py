"""The public contract: every request and response body of the REST API (pydantic).

One module per resource; import from `app.schemas` (this package re-exports them all).
"""

from app.schemas.catalog import (
    CheckResult,
    ConditionList,
    ConditionOut,
    ModelList,
    ModelOut,
    Readiness,
)
from app.schemas.datasets import (
    MANIFEST_COLUMNS,
    CountRow,
    DatasetList,
    DatasetOut,
    ManifestRow,
    SplitCountRow,
)
from app.schemas.experiments import (
    BACKBONE_NAMES,
    TIMM_BACKBONE_PREFIX,
    DataOptions,
    ExperimentCreate,
    ExperimentList,
    ExperimentOut,
    RunCreate,
    RunList,
    RunOut,
    RunProgress,
    TrainingOptions,
)
from app.schemas.jobs import (
    ACTIVE_JOB_STATUSES,
    ChunkStep,
    JobCreate,
    JobList,
    JobOut,
    JobStatus,
    Progress,
    Strategy,
    Timings,
)

__all__ = [
    "ACTIVE_JOB_STATUSES",
    "BACKBONE_NAMES",
    "MANIFEST_COLUMNS",
    "TIMM_BACKBONE_PREFIX",
    "CheckResult",
    "ChunkStep",
    "ConditionList",
    "ConditionOut",
    "CountRow",
    "DataOptions",
    "DatasetList",
    "DatasetOut",
    "ExperimentCreate",
    "ExperimentList",
    "ExperimentOut",
    "JobCreate",
    "JobList",
    "JobOut",
    "JobStatus",
    "ManifestRow",
    "ModelList",
    "ModelOut",
    "Progress",
    "Readiness",
    "RunCreate",
    "RunList",
    "RunOut",
    "RunProgress",
    "SplitCountRow",
    "Strategy",
    "Timings",
    "TrainingOptions",
]
