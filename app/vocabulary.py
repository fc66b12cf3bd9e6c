"""The condition vocabulary and the generator model registry (both are data, not code).

The vocabulary is per key: the seeded conditions are everyone's, a label a key uploads is that
key's (`condition_owners`). Look conditions up here with the caller's key, never globally.

A generator model is a diffusers pipeline directory under `models_dir`; registering reads only
its model_index.json and synthderm.json (its own sampler defaults), so the API never needs torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import bindparam, exists, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from app.db.tables import Condition, ConditionOwner, GeneratorModel, Job, utcnow

log = logging.getLogger(__name__)

# Accents are folded (dropped) only on letters of these alphabets: Latin, IPA, Greek,
# Cyrillic and Latin Extended Additional. Elsewhere a mark is part of the letter (a Japanese
# dakuten, a Devanagari virama or vowel sign) and is kept.
_ACCENTED_BLOCKS = ((0x0000, 0x052F), (0x1E00, 0x1EFF))


def _accented_script(char: str) -> bool:
    return any(low <= ord(char) <= high for low, high in _ACCENTED_BLOCKS)


def _word_char(char: str) -> bool:
    return char.isalnum() or unicodedata.category(char).startswith("M")


def slugify(label: str) -> str:
    """'Basal cell carcinoma' -> 'basal-cell-carcinoma': the words (letters and digits of any
    script, casefolded, accents folded: 'Café' -> 'cafe'), joined by '-'. '湿疹' -> '湿疹'.
    An ASCII label's slug is what it has always been (runs of [a-z0-9] joined by '-')."""
    folded: list[str] = []
    fold_marks = True
    for char in unicodedata.normalize("NFKD", label.casefold()):
        if unicodedata.category(char).startswith("M"):
            if not fold_marks:
                folded.append(char)
            continue
        fold_marks = _accented_script(char)
        folded.append(char)
    text = unicodedata.normalize("NFC", "".join(folded))
    words: list[str] = []
    current: list[str] = []
    for char in text:
        if _word_char(char) and (current or not unicodedata.category(char).startswith("M")):
            current.append(char)
        elif current:
            words.append("".join(current))
            current = []
    if current:
        words.append("".join(current))
    return "-".join(words)


def condition_name(label: str) -> str:
    """The words a prompt uses for a label: 'Basal cell carcinoma' -> 'basal cell carcinoma',
    and a label written as an identifier, 'acne-vulgaris' or 'Acne_Vulgaris', -> 'acne
    vulgaris' (the paper's prompt has the condition with spaces). A label that already has
    spaces keeps its hyphens ('t-cell lymphoma')."""
    words = " ".join(label.strip().lower().split())
    return words if " " in words else " ".join(re.split(r"[-_]+", words)).strip()


@dataclass(frozen=True)
class KnownCondition:
    """A condition as one key sees it: `name` is its own words for a label it uploaded;
    `shared` is true for the seeded vocabulary, which every key sees."""

    slug: str
    name: str
    shared: bool


# The vocabulary is per key (issue 21): a condition nobody owns (the seeded ones) is everyone's;
# a label a key uploaded is seen, validated and prompted with only by the keys that own it.
_OWNERLESS = ~exists().where(ConditionOwner.slug == Condition.slug)


_anyone = aliased(ConditionOwner)
# (shared name, the key's own name, whether nobody owns it) of one slug; built once, since
# building the aliased join costs more than running it
_CONDITION_AS_SEEN = (
    select(
        Condition.name,
        ConditionOwner.name,
        ~exists().where(_anyone.slug == Condition.slug).correlate(Condition),
    )
    .outerjoin(
        ConditionOwner,
        (ConditionOwner.slug == Condition.slug)
        & (ConditionOwner.owner_id == bindparam("owner_id")),
    )
    .where(Condition.slug == bindparam("slug"))
)


def get_condition(*, session: Session, slug: str, owner_id: str) -> KnownCondition | None:
    """The condition `slug` as key `owner_id` sees it; None if that key may not use it. One
    query (POST /jobs asks it on every request)."""
    row = session.execute(_CONDITION_AS_SEEN, {"slug": slug, "owner_id": owner_id}).first()
    if row is None:
        return None
    shared_name, own_name, ownerless = row
    if own_name is not None:
        return KnownCondition(slug=slug, name=own_name, shared=False)
    return KnownCondition(slug=slug, name=shared_name, shared=True) if ownerless else None


def job_condition(*, session: Session, job_id: str) -> KnownCondition | None:
    """The condition a job names, as the job's owner sees it (the words of its prompt)."""
    job = session.get(Job, job_id)
    if job is None or job.condition is None:
        return None
    return get_condition(session=session, slug=job.condition, owner_id=job.owner_id)


def list_conditions(*, session: Session, owner_id: str) -> list[KnownCondition]:
    """Every condition key `owner_id` may use, by slug: the shared ones and its own."""
    shared = session.execute(select(Condition.slug, Condition.name).where(_OWNERLESS))
    own = session.execute(
        select(ConditionOwner.slug, ConditionOwner.name).where(ConditionOwner.owner_id == owner_id)
    )
    found = [KnownCondition(slug=s, name=n, shared=True) for s, n in shared]
    found += [KnownCondition(slug=s, name=n, shared=False) for s, n in own]
    return sorted(found, key=lambda c: c.slug)


def add_conditions(*, session: Session, labels: list[tuple[str, str]], owner_id: str) -> list[str]:
    """Make the conditions of (slug, label) pairs usable by key `owner_id`, each named after
    its label: a slug new to the service is created, and a slug that is not shared becomes
    the key's too. Returns the slugs new to this key's vocabulary. Flushed, not committed;
    a concurrent upload of the same label by another key is not a conflict."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    added = []
    now = utcnow()
    for slug, label in labels:
        name = condition_name(label)
        existed = session.get(Condition, slug) is not None
        if existed and (
            session.get(ConditionOwner, (slug, owner_id)) is not None  # already this key's
            or session.scalar(select(Condition.slug).where(Condition.slug == slug, _OWNERLESS))
        ):
            continue  # or shared: the seeded vocabulary stays everyone's
        session.execute(  # another key's upload may create it meanwhile: then it is both's
            insert(Condition)
            .values(slug=slug, name=name, created_at=now)
            .on_conflict_do_nothing(index_elements=["slug"])
        )
        session.execute(
            insert(ConditionOwner)
            .values(slug=slug, owner_id=owner_id, name=name, created_at=now)
            .on_conflict_do_nothing(index_elements=["slug", "owner_id"])
        )
        added.append(slug)
    session.flush()
    return added


def add_job_conditions(
    *, session: Session, job_id: str, labels: list[tuple[str, str]]
) -> list[str]:
    """add_conditions for the owner of job `job_id` (an ingest found these labels)."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id!r}")
    return add_conditions(session=session, labels=labels, owner_id=job.owner_id)


def get_model(*, session: Session, model_id: str) -> GeneratorModel | None:
    return session.get(GeneratorModel, model_id)


def list_models(*, session: Session, owner_id: str | None = None) -> list[GeneratorModel]:
    """The models key `owner_id` may name: the base models and its own fine-tuned ones
    (every model when None)."""
    query = select(GeneratorModel).order_by(GeneratorModel.id)
    if owner_id is not None:
        query = query.where(
            (GeneratorModel.owner_id.is_(None)) | (GeneratorModel.owner_id == owner_id)
        )
    return list(session.scalars(query))


class ModelChoice(NamedTuple):
    """What a job's `model` resolved to: the model, or why it names none (a message)."""

    model: GeneratorModel | None
    problem: str | None


def resolve_model(
    *, session: Session, model_id: str, owner_id: str, condition: str, inpaint: bool | None = None
) -> ModelChoice:
    """The model a job of `condition` uses when it names `model_id`: a model the key may use,
    or a fine-tune family, whose member of that condition (or whose joint model) it is. With
    `inpaint` set, a family id gives its model of that kind (a scratch family's id is its
    text-to-image model's, and `{id}-inpaint` its inpainting model)."""
    model = session.get(GeneratorModel, model_id)
    if model is not None and model.owner_id not in (None, owner_id):
        model = None  # another key's model is an unknown one
    if model is not None:
        # a model named by its own id is that model, unless the id is also its family's
        if model.family_id != model.id or inpaint is None or _is_inpaint(model) == inpaint:
            return ModelChoice(model, None)
        family_id = model.family_id
    else:
        family_id = model_id
    members = list(
        session.scalars(
            select(GeneratorModel)
            .where(GeneratorModel.family_id == family_id, GeneratorModel.owner_id == owner_id)
            .order_by(GeneratorModel.id)
        )
    )
    if not members:
        return ModelChoice(None, f"unknown model {model_id!r} (GET /models lists them)")
    fitting = [m for m in members if m.condition in (condition, None)]
    for member in fitting:
        if inpaint is None or _is_inpaint(member) == inpaint:
            return ModelChoice(member, None)
    if fitting:  # the right condition, the wrong kind: the caller's check says so
        return ModelChoice(model or fitting[0], None)
    have = sorted(m.condition for m in members if m.condition)
    return ModelChoice(
        None,
        f"fine-tune family {model_id!r} has no model of {condition!r} "
        f"(it has: {', '.join(have) or 'none yet'})",
    )


def _is_inpaint(model: GeneratorModel) -> bool:
    return "Inpaint" in model.pipeline_class


def read_pipeline_class(path: Path) -> str:
    """The diffusers pipeline class named by a model directory; ValueError if it is not one."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    data = json.loads(index.read_text())
    name = data.get("_class_name")
    if not isinstance(name, str):
        raise ValueError(f"{index} has no _class_name")
    return name


# Beside model_index.json, a model's own settings: {"sampling": {"guidance_scale": 12.0}}
SETTINGS_FILE = "synthderm.json"


def read_sampling_defaults(path: Path) -> dict[str, Any] | None:
    """The sampler defaults of a model directory (its synthderm.json's `sampling`), None when
    it has none; ValueError naming the file and the field when they are not valid."""
    from pydantic import ValidationError

    from app.schemas.jobs import ModelSampling

    file = path / SETTINGS_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {"sampling"}:
        raise ValueError(f'{file} must be one object with one key, "sampling"')
    try:
        sampling = ModelSampling.model_validate(data["sampling"])
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in ("sampling", *first["loc"]))
        raise ValueError(f"{file}: {field}: {first['msg']}") from exc
    return sampling.model_dump(exclude_none=True) or None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_signature(path: Path) -> str:
    """A cheap fingerprint (names, sizes, mtimes) telling when the weights must be re-hashed."""
    lines = [
        f"{p.relative_to(path).as_posix()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in _weight_files(path)
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def weights_sha256(path: Path) -> str:
    """SHA-256 over every weight file (name and bytes), recorded with every image."""
    digest = hashlib.sha256()
    for file in _weight_files(path):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def register_model(
    *, session: Session, model_id: str, path: Path, description: str = ""
) -> GeneratorModel:
    """Register (or update) a generator from a local pipeline directory."""
    pipeline_class = read_pipeline_class(path)
    sampling = read_sampling_defaults(path)
    signature = weights_signature(path)
    row = session.get(GeneratorModel, model_id)
    if row is None:
        row = GeneratorModel(id=model_id, path=str(path), pipeline_class=pipeline_class)
        session.add(row)
    if row.weights_signature != signature or row.path != str(path) or not row.weights_sha256:
        log.info("hashing the weights of %s in %s", model_id, path)
        row.weights_sha256 = weights_sha256(path)
        row.weights_signature = signature
    row.path = str(path)
    row.pipeline_class = pipeline_class
    row.sampling_defaults = sampling
    row.description = description or row.description or ""
    row.updated_at = utcnow()
    session.flush()
    return row


def register_models_in(*, session: Session, models_dir: Path) -> list[str]:
    """Register every pipeline directory directly under `models_dir` (id = folder name)."""
    found: list[str] = []
    if not models_dir.is_dir():
        return found
    for child in sorted(models_dir.iterdir()):
        if (child / "model_index.json").is_file():
            register_model(session=session, model_id=child.name, path=child.resolve())
            found.append(child.name)
    return found


# The project's own generator (issue 24), committed under models/ (relative to the checkout):
# every `db upgrade` registers it beside the models in models_dir, which win on a shared id.
BUILTIN_MODELS = {
    "synthderm-fitz64": Path("models/synthderm-fitz64/text-to-image"),
    "synthderm-fitz64-inpaint": Path("models/synthderm-fitz64/inpaint"),
}
BUILTIN_DESCRIPTION = (
    "the project's own 64-px latent diffusion model, trained on the Fitzpatrick17k train split "
    "(models/synthderm-fitz64/MODEL_CARD.md); research and non-commercial use only"
)


def register_builtin_models(*, session: Session, root: Path, skip: Iterable[str] = ()) -> list[str]:
    """Register the committed generators found under the checkout `root`; returns their ids."""
    found = []
    for model_id, relative in BUILTIN_MODELS.items():
        path = root / relative
        if model_id not in skip and (path / "model_index.json").is_file():
            register_model(
                session=session, model_id=model_id, path=path.resolve(),
                description=BUILTIN_DESCRIPTION,
            )  # fmt: skip
            found.append(model_id)
    return found
