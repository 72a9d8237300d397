"""The ensemble artifact format, shared by the gateway (which builds one from registered models without
any ML framework) and the classifier service (which serves it).

A zip: `manifest.json` = {"format": 1, "members": [{"ref", "file", "per_class_f1": {label: f1 | null}}]}
and each member's own artifact under `members/<i>.bin`. A null F1 is a class the member had no
validation images for.
"""

import io
import json
import zipfile
from typing import Any

ENSEMBLE_FORMAT = 1
# Fixed zip timestamps: the same members give the same bytes, hence the same sha256.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def build_ensemble_artifact(members: list[tuple[str, bytes, dict[str, float]]]) -> bytes:
    """Zip (ref "name:version", member artifact, its validation F1 per class) triples into an ensemble
    artifact. Uses only zipfile and json, so the gateway can build ensembles without an ML framework."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    manifest: dict[str, Any] = {"format": ENSEMBLE_FORMAT, "members": []}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, (ref, artifact, per_class_f1) in enumerate(members):
            if not per_class_f1:
                raise ValueError(f"member {ref!r} has no per-class F1; use its training metrics' per_class f1")
            for label, f1 in per_class_f1.items():
                if f1 is not None and not 0 <= f1 <= 1:
                    raise ValueError(f"member {ref!r}: F1 of {label!r} must be from 0 to 1 or null, got {f1!r}")
            name = f"members/{index}.bin"
            archive.writestr(zipfile.ZipInfo(name, ZIP_DATE_TIME), artifact)
            manifest["members"].append({"ref": ref, "file": name, "per_class_f1": {
                label: None if f1 is None else float(f1) for label, f1 in per_class_f1.items()}})
        archive.writestr(zipfile.ZipInfo("manifest.json", ZIP_DATE_TIME), json.dumps(manifest, sort_keys=True))
    return buffer.getvalue()


def read_ensemble_artifact(artifact: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """The manifest and the members' artifacts, in manifest order."""
    try:
        with zipfile.ZipFile(io.BytesIO(artifact)) as archive:
            manifest = json.loads(archive.read("manifest.json"))
            if manifest.get("format") != ENSEMBLE_FORMAT:
                raise ValueError(f"ensemble format {manifest.get('format')!r} is not supported "
                                 f"(this code reads format {ENSEMBLE_FORMAT})")
            return manifest, [archive.read(member["file"]) for member in manifest["members"]]
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"not an ensemble artifact: {exc}") from exc
