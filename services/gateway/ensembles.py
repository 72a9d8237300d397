"""Ensembles: trained classifiers voting together, each weighted per class by its validation F1."""

import hashlib

from percept.db import registry
from percept.db.models import Model
from percept.db.session import session_scope
from percept.ensembles import build_ensemble_artifact
from percept.errors import Conflict, InvalidInput, NotFound
from percept.infra import Infra
from percept.storage import object_key_for

ENSEMBLE_PREDICTOR = "services.classifier.ensemble:EnsembleClassifier"


def create_ensemble(infra: Infra, tenant_id: str, name: str, member_refs: list[str]) -> Model:
    with session_scope(infra.database_url) as session:
        if registry.is_builtin_name(session, name):
            raise Conflict(f"{name!r} is a built-in model; choose another name.", code="model_name_reserved")
        members: list[Model] = []
        for ref in member_refs:
            member_name, _, version = ref.partition(":")
            versions = [m for m in registry.model_versions(session, tenant_id, member_name) if m.tenant_id]
            chosen = versions[-1] if versions and not version else next(
                (m for m in versions if m.version == version), None)
            if chosen is None:
                raise NotFound(f"No trained model {ref!r} of yours; train one with POST /v1/train/classifier.",
                               code="model_not_found")
            if chosen.kind != "classify" or chosen.predictor == ENSEMBLE_PREDICTOR or not chosen.artifact_key:
                raise InvalidInput(f"{ref!r} is not a trained classifier; ensembles combine trained classifiers.",
                                   code="invalid_ensemble_member")
            members.append(chosen)
    if len({(m.name, m.version) for m in members}) < len(members):
        raise InvalidInput("An ensemble's members must be different models.", code="invalid_ensemble_member")

    # Built outside the transaction: reading artifacts from storage can take a while.
    parts = []
    for member in members:
        per_class = member.metrics.get("per_class", {})
        parts.append((f"{member.name}:{member.version}", infra.store.get(member.artifact_key),
                      {label: values.get("f1") for label, values in per_class.items()}))
    artifact = build_ensemble_artifact(parts)
    sha256 = hashlib.sha256(artifact).hexdigest()
    key = object_key_for(sha256, prefix="models")
    infra.store.put(key, artifact)
    with session_scope(infra.database_url) as session:
        model = registry.register_version(session, tenant_id, Model(
            name=name, kind="classify", status="ready", weights_sha256=sha256, predictor=ENSEMBLE_PREDICTOR,
            artifact_key=key,
            metrics={"members": {ref: f1 for ref, _, f1 in parts}},
            card={"type": "ensemble", "members": [ref for ref, _, _ in parts],
                  "weighting": "each member's vote for a class is weighted by its validation F1 on that class"}))
        session.commit()
    return model
