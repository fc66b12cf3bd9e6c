"""/models and /conditions: what jobs may name."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CallerDep, SessionDep
from app.api.problems import problem_responses
from app.finetunes.views import models_out
from app.schemas import ConditionList, ConditionOut, ModelList
from app.vocabulary import list_conditions, list_models

router = APIRouter(tags=["catalog"], responses=problem_responses(401, 422))


@router.get("/models", response_model=ModelList)
def get_models(session: SessionDep, caller: CallerDep) -> ModelList:
    """Generators a job may name: the base models and the caller's fine-tuned ones (with
    their base, condition, fine-tune, hyperparameters, training images, final loss and
    weights sha256)."""
    return ModelList(items=models_out(list_models(session=session, owner_id=caller.id)))


@router.get("/conditions", response_model=ConditionList)
def get_conditions(session: SessionDep, caller: CallerDep) -> ConditionList:
    """The caller's condition vocabulary: the shared (seeded) slugs and the labels it uploaded."""
    known = list_conditions(session=session, owner_id=caller.id)
    return ConditionList(
        items=[ConditionOut(slug=c.slug, name=c.name, shared=c.shared) for c in known]
    )
