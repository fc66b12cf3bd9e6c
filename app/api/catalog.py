"""/models and /conditions: what jobs may name."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CallerDep, SessionDep
from app.schemas import ConditionList, ConditionOut, ModelList, ModelOut
from app.vocabulary import list_conditions, list_models

router = APIRouter(tags=["catalog"])


@router.get("/models", response_model=ModelList)
def get_models(session: SessionDep, _caller: CallerDep) -> ModelList:
    """Generators the workers can load."""
    return ModelList(
        items=[
            ModelOut(
                id=m.id,
                pipeline_class=m.pipeline_class,
                description=m.description,
                created_at=m.created_at,
            )
            for m in list_models(session=session)
        ]
    )


@router.get("/conditions", response_model=ConditionList)
def get_conditions(session: SessionDep, _caller: CallerDep) -> ConditionList:
    """The condition vocabulary (slugs)."""
    return ConditionList(
        items=[ConditionOut(slug=c.slug, name=c.name) for c in list_conditions(session=session)]
    )
