"""A finalizer that fails (here: the subject of an enrollment was deleted while its job waited) fails its
own job with a clear code, once; its batch neighbours are written and the worker serves on."""

import pytest
from PIL import ImageOps
from skimage import data
from sqlalchemy import func, text, update

from percept.config import Settings
from percept.db.ids import new_id
from percept.db.models import Job, JobStatus
from percept.db.session import session_scope
from percept.db.tenants import tenant_id_for_key
from percept.infra import resolve_infra
from tests.conftest import image_bytes, wait_for_job
from tests.own_platform import own_platform
from workers.runtime import JobRuntime

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def late_worker(tmp_path_factory):
    """A platform whose face worker the test starts when it is ready for it."""
    with own_platform(tmp_path_factory.mktemp("finalizers")) as plat:
        yield plat


def astronaut_png(size: int = 512, mirrored: bool = False) -> bytes:
    from PIL import Image

    image = Image.fromarray(data.astronaut()).resize((size, size))
    return image_bytes(ImageOps.mirror(image) if mirrored else image, "PNG")


def enroll(client, subject: str, photo: bytes) -> dict:
    answer = client.post(f"/v1/collections/crew/subjects/{subject}/faces", files={"image": ("a.png", photo)})
    assert answer.status_code == 202, answer.text
    return answer.json()


def faces_of(database_url: str, subject_id: str) -> int:
    with session_scope(database_url) as session:
        return session.execute(text("SELECT count(*) FROM face_embeddings WHERE subject_id = :s"),
                               {"s": subject_id}).scalar_one()


def test_enrolling_into_a_subject_deleted_meanwhile_fails_that_job_once_and_the_worker_serves_on(late_worker):
    with late_worker.client(late_worker.new_key()) as client:
        assert client.post("/v1/collections", json={"name": "crew"}).status_code == 201
        for name in ("gone", "kept"):
            assert client.post("/v1/collections/crew/subjects", json={"name": name}).status_code == 201
        doomed = enroll(client, "gone", astronaut_png())
        kept = enroll(client, "kept", astronaut_png(480, mirrored=True))
        # Deleted while its enrollment waits in the queue (no face worker runs yet).
        assert client.delete("/v1/collections/crew/subjects/gone").json() == {"deleted": "gone",
                                                                             "embeddings_deleted": 0}
        late_worker.start_worker("face-worker", "facerec")

        failed = wait_for_job(client, doomed["id"], timeout=120)
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "subject_deleted" and "'gone'" in failed["error"]["message"]
        assert failed["attempts"] == 1 and failed["output"] is None
        # The next job on the same worker, and one after it, are enrolled as ever.
        done = wait_for_job(client, kept["id"], timeout=60)
        assert done["status"] == "succeeded", done["error"]
        assert done["output"]["faces_enrolled"] == 1
        again = wait_for_job(client, enroll(client, "kept", astronaut_png())["id"], timeout=60)
        assert again["status"] == "succeeded" and again["output"]["faces_enrolled"] == 2
        assert {s["name"]: s["faces"] for s in client.get("/v1/collections/crew/subjects").json()} == {"kept": 2}


def test_one_jobs_failed_finalizer_or_lost_claim_leaves_its_batch_neighbours_written(late_worker):
    """Four enrollments written in one transaction (as a batch is): each finalizer runs in a savepoint."""
    key = late_worker.new_key()
    with late_worker.client(key) as client:
        assert client.post("/v1/collections", json={"name": "crew"}).status_code == 201
        names = ("deleted", "written", "broken", "lost")
        for name in names:
            assert client.post("/v1/collections/crew/subjects", json={"name": name}).status_code == 201
        collection_id = client.get("/v1/collections").json()[0]["id"]
        subject_ids = {s["name"]: s["id"] for s in client.get("/v1/collections/crew/subjects").json()}
        image = client.post("/v1/images", files={"file": ("a.png", astronaut_png())}).json()
    with session_scope(late_worker.database_url) as session:
        tenant_id = tenant_id_for_key(session, key)
        assert tenant_id is not None
        job_ids = {}
        for name in names:
            job_ids[name] = new_id("job")
            inputs = [{"image_id": image["id"], "sha256": image["sha256"]}]
            session.add(Job(id=job_ids[name], tenant_id=tenant_id, kind="faces_enroll", queue="facerec",
                            status=JobStatus.QUEUED, model_name="dlib-face-enroller:1", inputs=inputs,
                            params={"collection": "crew", "collection_id": collection_id, "subject": name,
                                    "subject_id": subject_ids[name], "threshold": 0.6},
                            progress={"done": 0, "total": 1}, provenance={"inputs": inputs}, attempts=0,
                            cancel_requested=False))
        session.commit()

    with late_worker.client(key) as client:  # while its job waits
        assert client.delete("/v1/collections/crew/subjects/deleted").status_code == 200

    # 1. The runtime claims the four jobs and their predictions come back (one of them as a bug would have it)
    runtime = JobRuntime(resolve_infra(Settings(database_url=late_worker.database_url,
                                                broker_url=late_worker.broker_url,
                                                storage_url=late_worker.storage_url)))
    claimed = {job.params["subject"]: job for job in runtime._claim(list(job_ids.values()))}
    assert set(claimed) == set(names)
    for offset, (name, job) in enumerate(claimed.items()):
        face = {"box": [10, 10, 100, 100], "score": 1.0, "sharpness": 200.0,
                "embedding": [offset + i / 128 for i in range(128)]}
        job.output = {"faces_found": 1, "face": face} if name != "broken" else {"faces_found": 1}
    # 2. Meanwhile the sweeper gave up on one of them (its worker seemed lost): that attempt lost its claim
    with session_scope(late_worker.database_url) as session:
        session.execute(update(Job).where(Job.id == job_ids["lost"]).values(
            status=JobStatus.FAILED, finished_at=func.now(), error={"code": "worker_lost", "message": "Lost."}))
        session.commit()

    # 3. All four are written in one transaction
    runtime._write_results(list(claimed.values()))

    with session_scope(late_worker.database_url) as session:
        jobs = {name: session.get(Job, job_id) for name, job_id in job_ids.items()}
        assert jobs["written"].status is JobStatus.SUCCEEDED and jobs["written"].output["faces_enrolled"] == 1
        assert jobs["deleted"].status is JobStatus.FAILED
        assert jobs["deleted"].error["code"] == "subject_deleted" and jobs["deleted"].output is None
        assert jobs["broken"].status is JobStatus.FAILED and jobs["broken"].error["code"] == "internal_error"
        assert jobs["lost"].error["code"] == "worker_lost" and jobs["lost"].output is None  # as the sweeper left it
    assert faces_of(late_worker.database_url, subject_ids["written"]) == 1
    assert faces_of(late_worker.database_url, subject_ids["broken"]) == 0
    assert faces_of(late_worker.database_url, subject_ids["lost"]) == 0  # its embedding went with its write
