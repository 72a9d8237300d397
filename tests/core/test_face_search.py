"""1:N face search in Postgres: pgvector's HNSW index and the exact path of a server without the
extension (the migration stores plain arrays there), checked against brute force."""

import math
import random
import uuid

import pytest

from percept.db import faces as face_repo
from percept.db.ids import new_id
from percept.db.migrate import upgrade
from percept.db.models import Collection, Subject
from percept.db.session import session_scope
from percept.db.tenants import create_key
from percept.embedded import start_postgres

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["pgvector", "exact"])
def database(request, tmp_path_factory):
    server, url = start_postgres(tmp_path_factory.mktemp(request.param))
    upgrade(url, pgvector=request.param == "pgvector")
    yield request.param, url
    server.cleanup()


def unit(rng: random.Random) -> list[float]:
    v = [rng.gauss(0, 1) for _ in range(128)]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def test_nearest_subjects_match_brute_force(database):
    kind, url = database
    rng = random.Random(0)
    with session_scope(url) as session:
        assert face_repo.uses_pgvector(session) is (kind == "pgvector")
        tenant, _ = create_key(session, f"t-{uuid.uuid4().hex[:6]}")
        collection = Collection(id=new_id("col"), tenant_id=tenant.id, name="people", threshold=0.6)
        session.add(collection)
        session.flush()
        vectors = {}
        for i in range(60):
            subject = Subject(id=new_id("sub"), collection_id=collection.id, name=f"person-{i}")
            session.add(subject)
            session.flush()
            vectors[subject.name] = [unit(rng) for _ in range(2)]  # two faces each
            for vector in vectors[subject.name]:
                face_repo.add_embedding(session, collection.id, subject.id, vector, [0, 0, 10, 10], None, None)
        session.commit()

        for probe_of in ("person-3", "person-42"):
            probe = [x + rng.gauss(0, 0.02) for x in vectors[probe_of][1]]
            truth = sorted(((min(math.dist(probe, v) for v in vs), name) for name, vs in vectors.items()))[:3]
            found = face_repo.nearest_subjects(session, collection.id, probe, top_k=3)
            assert [m.subject for m in found] == [name for _, name in truth]
            assert [round(m.distance, 4) for m in found] == pytest.approx([d for d, _ in truth], abs=1e-3)
            near = face_repo.nearest_subjects(session, collection.id, probe, top_k=3, max_distance=0.5)
            assert [m.subject for m in near] == [probe_of]  # nothing beyond the threshold

        subject = face_repo.get_subject(session, collection.id, "person-3")
        assert face_repo.delete_subject(session, subject) == 2
        session.commit()
        probe = vectors["person-3"][0]
        assert all(m.subject != "person-3" for m in face_repo.nearest_subjects(session, collection.id, probe, 3))
