"""/models and /conditions: what jobs may name."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CallerDep, SessionDep
from app.api.problems import problem_responses
from app.schemas import ConditionList, ConditionOut, ModelList, ModelOut
from app.vocabulary import list_conditions, list_models

router = APIRouter(tags=["catalog"], responses=problem_responses(401, 422))


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
def get_conditions(session: SessionDep, caller: CallerDep) -> ConditionList:
    """The caller's condition vocabulary: the shared (seeded) slugs and the labels it uploaded."""
    known = list_conditions(session=session, owner_id=caller.id)
    return ConditionList(
        items=[ConditionOut(slug=c.slug, name=c.name, shared=c.shared) for c in known]
    )
