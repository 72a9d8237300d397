"""What the diffusion job kinds do with their results before they are written (their declared `finalizer`):
store each rendered PNG as an image of the tenant's with its provenance row, compare a reproduction with its
original, store a grid's contact sheets. The worker runtime runs them in the transaction that writes the job's
result, so an image and its record land exactly when the result does.

The one module of the service that touches the database: predictors stay free of it (import-linter)."""

from typing import Any

from sqlalchemy.orm import Session

from percept.db import generations as generation_repo
from percept.db import images as image_repo
from percept.db import jobs as job_repo
from percept.db.models import Generation, Image
from percept.infra import Infra
from percept.predictor import parse_model_ref


def _store_png(infra: Infra, session: Session, tenant_id: str, job_id: str, data: bytes) -> Image:
    return image_repo.add_job_image(session, infra.store, infra.settings.max_image_pixels, tenant_id, job_id, data)


def _store_images(infra: Infra, session: Session, tenant_id: str, job_id: str, params: dict[str, Any],
                  output: dict[str, Any]) -> list[dict[str, Any]]:
    """Each rendered image stored with its provenance (the PNG's record, plus the job and grid that made it)."""
    job = job_repo.get_job(session, tenant_id, job_id)
    grid_id = job.parent_id if job is not None else None
    name, version = parse_model_ref(str(params.get("model") or ""))
    stored = []
    for rendered in output.pop("images"):
        image = _store_png(infra, session, tenant_id, job_id, rendered.pop("png"))
        record = rendered.get("generation", {})
        generation_repo.add_generation(session, Generation(
            image_id=image.id, tenant_id=tenant_id, job_id=job_id, grid_id=grid_id, role="image",
            prompt=record.get("prompt"), negative_prompt=record.get("negative_prompt"),
            subject=record.get("subject"), style=record.get("style"),
            model_name=record.get("model", {}).get("name", name), model_version=record.get("model", {}).get(
                "version", version), seed=rendered["seed"],
            record={**record, "job_id": job_id, "grid_id": grid_id, "sha256": image.sha256}))
        stored.append({"image_id": image.id, "seed": rendered["seed"], "sha256": image.sha256,
                       "width": image.width, "height": image.height})
    return stored


def store_generated(infra: Infra, session: Session, tenant_id: str, job_id: str, params: dict[str, Any],
                    inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, Any]:
    """A generation's images become the tenant's, each with its provenance row."""
    images = _store_images(infra, session, tenant_id, job_id, params, output)
    return {"images": images, **output}


def store_reproduction(infra: Infra, session: Session, tenant_id: str, job_id: str, params: dict[str, Any],
                       inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, Any]:
    """The re-rendered image, stored, and whether its bytes are the original's (then it is the same image)."""
    [image] = _store_images(infra, session, tenant_id, job_id, params, output)
    original = params["reproduce"]
    return {"image_id": image["image_id"], "sha256": image["sha256"], "original_image_id": original["image_id"],
            "original_sha256": original["sha256"], "identical": image["sha256"] == original["sha256"],
            "seed": image["seed"], **{key: output[key] for key in ("device", "dtype") if key in output}}


def store_cards(infra: Infra, session: Session, tenant_id: str, job_id: str, params: dict[str, Any],
                inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, Any]:
    """A grid's contact sheets become the tenant's images (role `card`), listed in the grid's output."""
    name, version = parse_model_ref(str(params.get("model") or ""))
    sheets = []
    for card in output.pop("cards_png", []):
        image = _store_png(infra, session, tenant_id, job_id, card["png"])
        record = {"card": card["kind"], "style": card.get("style"), "subjects": params.get("subjects"),
                  "styles": params.get("styles"), "template": params.get("template"), "seed": params.get("seed"),
                  "model": params.get("model"), "grid_id": job_id, "job_id": job_id, "sha256": image.sha256}
        generation_repo.add_generation(session, Generation(
            image_id=image.id, tenant_id=tenant_id, job_id=job_id, grid_id=job_id, role="card",
            style=card.get("style"), model_name=name or None, model_version=version or None,
            seed=params.get("seed"), record=record))
        sheets.append({"image_id": image.id, "kind": card["kind"], "style": card.get("style")})
    return {**output, "cards": [sheet["image_id"] for sheet in sheets], "sheets": sheets}
