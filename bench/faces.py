"""Face search figures: 1:N identify latency (p50/p99) and recall@1 with 10k, 100k and 1M enrolled faces,
pgvector HNSW against exact search, through `percept.db.faces.nearest_subjects` as the face worker calls it.

A fresh embedded Postgres (pgserver: PostgreSQL 16 + pgvector 0.6.2) in a temp dir, migrated by
`percept.db.migrate.upgrade` (the real schema: `vector(128)` + HNSW m=16, ef_construction=64). Synthetic
faces: each subject is 1-3 unit 128-d vectors near a random centre; a query is a perturbed copy of a random
enrolled face, so a true nearest subject exists. Loading uses COPY (add_embedding is one INSERT per face, far
too slow for 1M); the HNSW index is dropped for the load and rebuilt, since inserting into a live HNSW graph
is the slow path (the `insert ms/face` figure measures it on the full index).

Recall@1 = share of queries whose HNSW top-1 subject is the exact search's top-1 subject; the exact path is
itself checked against a numpy brute force over the same vectors.

Run: .venv/bin/python bench/faces.py [--sizes 10000,100000,1000000] [--queries 200] [--device auto|cpu]

The search runs in Postgres; --device is checked as the face service checks PERCEPT_DEVICE (its models are
CPU builds, so a GPU is refused with the reason) and printed with the figures.
"""

import argparse
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from percept.config import get_settings
from percept.db import faces
from percept.db.migrate import upgrade
from percept.db.session import session_scope
from percept.embedded import start_postgres
from services.facerec.device import facerec_device

DIM = 128
TENANT_ID = "tenant_bench"
COLLECTION_ID = "coll_bench"
HNSW_INDEX = "ix_face_embeddings_embedding_hnsw"
P99_TARGET_MS = 50.0
RECALL_TARGET = 0.99
CHUNK = 100_000  # rows generated / copied / scanned at a time


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- Synthetic enrolment -------------------------------------------------------------------------------------

@dataclass
class Gallery:
    vectors: np.ndarray  # (n, DIM) float32, unit norm
    face_subject: np.ndarray  # (n,) subject index of each face
    subject_ids: list[str]


def subject_id(index: int) -> str:
    return f"subj_{index:021d}"  # 26 characters, a ULID's length


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_gallery(size: int, spread: float, rng: np.random.Generator) -> Gallery:
    """`size` faces of subjects with 1-3 faces each, every face about `spread` from its subject's centre."""
    per_subject = rng.integers(1, 4, size=size)
    ends = np.cumsum(per_subject)
    subjects = int(np.searchsorted(ends, size)) + 1
    face_subject = np.repeat(np.arange(subjects), per_subject[:subjects])[:size]
    vectors = np.empty((size, DIM), dtype=np.float32)
    centres = unit(rng.standard_normal((subjects, DIM))).astype(np.float32)
    for start in range(0, size, CHUNK):
        rows = face_subject[start:start + CHUNK]
        noise = rng.standard_normal((len(rows), DIM)).astype(np.float32) * (spread / np.sqrt(DIM))
        vectors[start:start + CHUNK] = unit(centres[rows] + noise)
    return Gallery(vectors, face_subject, [subject_id(i) for i in range(subjects)])


def make_queries(gallery: Gallery, count: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Perturbed copies of random enrolled faces (about `noise` away from them); returns (queries, source faces)."""
    sources = rng.choice(len(gallery.vectors), size=count, replace=False)
    jitter = rng.standard_normal((count, DIM)).astype(np.float32) * (noise / np.sqrt(DIM))
    return unit(gallery.vectors[sources] + jitter).astype(np.float32), sources


def brute_force_top1(gallery: Gallery, queries: np.ndarray) -> np.ndarray:
    """The nearest face's subject index per query (unit vectors: nearest in L2 = largest dot product)."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    best_face = np.zeros(len(queries), dtype=np.int64)
    for start in range(0, len(gallery.vectors), CHUNK):
        scores = gallery.vectors[start:start + CHUNK] @ queries.T  # (chunk, queries)
        top = scores.argmax(axis=0)
        value = scores[top, np.arange(len(queries))]
        better = value > best
        best[better] = value[better]
        best_face[better] = start + top[better]
    return gallery.face_subject[best_face]


# --- Loading -------------------------------------------------------------------------------------------------

def copy_binary_faces(cursor: psycopg.Cursor, collection_id: str, subject_ids: list[str], vectors: np.ndarray) -> None:
    """COPY (collection_id, subject_id, embedding) in PostgreSQL's binary format, built with numpy: pgvector's
    binary `vector` is int16 dim, int16 unused (0), then dim big-endian float4s. No text formatting of 128M
    floats on either side."""
    collection = collection_id.encode()
    id_length = len(subject_ids[0])
    row = np.dtype([
        ("fields", ">i2"), ("collection_len", ">i4"), ("collection", f"S{len(collection)}"),
        ("subject_len", ">i4"), ("subject", f"S{id_length}"),
        ("vector_len", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("values", ">f4", (DIM,)),
    ])
    with cursor.copy("COPY face_embeddings (collection_id, subject_id, embedding) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0))
        for start in range(0, len(vectors), CHUNK):
            chunk = vectors[start:start + CHUNK]
            rows = np.zeros(len(chunk), dtype=row)
            rows["fields"] = 3
            rows["collection_len"] = len(collection)
            rows["collection"] = collection
            rows["subject_len"] = id_length
            rows["subject"] = np.array(subject_ids[start:start + CHUNK], dtype=f"S{id_length}")
            rows["vector_len"] = 4 + 4 * DIM
            rows["dim"] = DIM
            rows["values"] = chunk
            copy.write(rows.tobytes())
        copy.write(struct.pack(">h", -1))


def load(conninfo: str, gallery: Gallery) -> float:
    """Empty the tables, drop the HNSW index, COPY subjects and faces; returns seconds (one transaction)."""
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute("TRUNCATE face_embeddings, subjects RESTART IDENTITY")
        connection.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")
        connection.execute("CHECKPOINT")
    start = time.perf_counter()
    with psycopg.connect(conninfo) as connection, connection.cursor() as cursor:
        with cursor.copy("COPY subjects (id, collection_id, name) FROM STDIN") as copy:
            for index, sid in enumerate(gallery.subject_ids):
                copy.write_row((sid, COLLECTION_ID, f"person {index}"))
        face_ids = [gallery.subject_ids[i] for i in gallery.face_subject]
        copy_binary_faces(cursor, COLLECTION_ID, face_ids, gallery.vectors)
        connection.commit()
    return time.perf_counter() - start


def build_index(conninfo: str, index_sql: str, maintenance_work_mem: str) -> tuple[float, list[str]]:
    """Seconds to build the HNSW index, and the server's notices (pgvector says when the graph outgrows
    maintenance_work_mem and the build falls back to the much slower on-disk path)."""
    notices: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary))
        connection.execute(f"SET maintenance_work_mem = '{maintenance_work_mem}'")
        connection.execute("SET max_parallel_maintenance_workers = 1")
        start = time.perf_counter()
        connection.execute(index_sql)
        elapsed = time.perf_counter() - start
        connection.execute("VACUUM ANALYZE face_embeddings")
        connection.execute("VACUUM ANALYZE subjects")
    return elapsed, notices


def insert_cost_ms(conninfo: str, gallery: Gallery, count: int, rng: np.random.Generator) -> float:
    """Milliseconds per face to COPY `count` more faces into the full table with the HNSW index in place
    (what enrolment pays per face once the collection is big)."""
    sources = rng.choice(len(gallery.vectors), size=count, replace=False)
    jitter = rng.standard_normal((count, DIM)).astype(np.float32) * (0.3 / np.sqrt(DIM))
    vectors = unit(gallery.vectors[sources] + jitter).astype(np.float32)
    with psycopg.connect(conninfo) as connection, connection.cursor() as cursor:
        start = time.perf_counter()
        face_ids = [gallery.subject_ids[gallery.face_subject[i]] for i in sources]
        copy_binary_faces(cursor, COLLECTION_ID, face_ids, vectors)
        connection.commit()
        return (time.perf_counter() - start) * 1000 / count


# --- Queries -------------------------------------------------------------------------------------------------

def plan_uses_hnsw(conninfo: str, query: np.ndarray, exact: bool) -> bool:
    """EXPLAIN nearest_subjects' statement under the settings it applies."""
    literal = "[" + ",".join(f"{v:.8g}" for v in query.tolist()) + "]"
    with psycopg.connect(conninfo) as connection:
        if exact:
            connection.execute("SET LOCAL enable_indexscan = off")
        plan = "\n".join(row[0] for row in connection.execute(
            "EXPLAIN SELECT e.subject_id, s.name, e.embedding <-> %(q)s::vector AS distance "
            "FROM face_embeddings e JOIN subjects s ON s.id = e.subject_id "
            "WHERE e.collection_id = %(c)s ORDER BY e.embedding <-> %(q)s::vector LIMIT 5",
            {"q": literal, "c": COLLECTION_ID}))
    return HNSW_INDEX in plan


def timed_search(session_factory, queries: np.ndarray, exact: bool) -> tuple[list[float], list[str | None]]:
    """Each identify end to end as the gateway runs it: session, statement(s), rows to FaceMatch, close."""
    latencies, top1 = [], []
    for query in queries:
        vector = query.tolist()
        start = time.perf_counter()
        with session_factory() as session:
            matches = faces.nearest_subjects(session, COLLECTION_ID, vector, top_k=1, exact=exact)
        latencies.append((time.perf_counter() - start) * 1000)
        top1.append(matches[0].subject_id if matches else None)
    return latencies, top1


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


@dataclass
class Row:
    size: int
    load_s: float
    build_s: float
    exact_p50: float
    exact_p99: float
    exact_queries: int
    hnsw: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)  # ef -> p50, p99, recall, vs np
    insert_ms: float = float("nan")
    notes: list[str] = field(default_factory=list)


def run_size(size: int, args, url: str, conninfo: str, index_sql: str, rng: np.random.Generator) -> Row:
    log(f"{size:,} faces: generating")
    gallery = make_gallery(size, args.spread, rng)
    queries, sources = make_queries(gallery, args.queries, args.noise, rng)
    exact_count = args.exact_queries or (args.queries if size < 1_000_000 else min(args.queries, 50))
    truth = brute_force_top1(gallery, queries)
    truth_ids = [gallery.subject_ids[i] for i in truth]
    log(f"{size:,} faces ({len(gallery.subject_ids):,} subjects): loading with COPY")
    load_s = load(conninfo, gallery)
    log(f"loaded in {load_s:.1f} s; building the HNSW index")
    build_s, notices = build_index(conninfo, index_sql, args.maintenance_work_mem)
    log(f"index built in {build_s:.1f} s")
    row = Row(size, load_s, build_s, 0, 0, exact_count)
    row.notes += [f"index build notice: {notice}" for notice in notices]
    own_subject = np.mean(truth == gallery.face_subject[sources])
    if own_subject < 1:
        row.notes.append(f"{1 - own_subject:.1%} of queries are nearest to another subject than their source's")
    if not plan_uses_hnsw(conninfo, queries[0], exact=False):
        row.notes.append("the HNSW statement's plan does not use the HNSW index")
    if plan_uses_hnsw(conninfo, queries[0], exact=True):
        row.notes.append("the exact statement's plan uses the HNSW index")

    # The exact path on its own engine (own connections, own prepared statements), so its plans never
    # stand in for the HNSW path's or the other way round.
    exact_engine = create_engine(url, pool_size=1)
    exact_sessions = sessionmaker(exact_engine)
    timed_search(exact_sessions, queries[:3], exact=True)  # warm-up: connection, table in cache
    log(f"exact search x{exact_count}")
    exact_ms, exact_top1 = timed_search(exact_sessions, queries[:exact_count], exact=True)
    exact_engine.dispose()
    row.exact_p50, row.exact_p99 = percentile(exact_ms, 50), percentile(exact_ms, 99)
    wrong = sum(a != b for a, b in zip(exact_top1, truth_ids[:exact_count], strict=True))
    if wrong:
        row.notes.append(f"exact search disagrees with numpy brute force on {wrong}/{exact_count} queries")

    def hnsw_session():
        return session_scope(url)

    original = faces.HNSW_EF_SEARCH
    try:
        for ef in args.ef:
            faces.HNSW_EF_SEARCH = ef
            timed_search(hnsw_session, queries[:10], exact=False)  # warm-up
            log(f"HNSW ef_search={ef} x{len(queries)}")
            hnsw_ms, hnsw_top1 = timed_search(hnsw_session, queries, exact=False)
            recall = np.mean([a == b for a, b in zip(hnsw_top1[:exact_count], exact_top1, strict=True)])
            recall_np = np.mean([a == b for a, b in zip(hnsw_top1, truth_ids, strict=True)])
            row.hnsw[ef] = (percentile(hnsw_ms, 50), percentile(hnsw_ms, 99), float(recall), float(recall_np))
    finally:
        faces.HNSW_EF_SEARCH = original
    row.insert_ms = insert_cost_ms(conninfo, gallery, args.insert_faces, rng)
    log(f"{size:,} done")
    return row


# --- Server --------------------------------------------------------------------------------------------------

def start_server(data_dir: Path, shared_buffers: str):
    """pgserver with shared_buffers raised (the default 128MB holds little of a 1M-face index): set it, then
    stop and start again so the server reads it."""
    server, url = start_postgres(data_dir)
    if shared_buffers:
        with psycopg.connect(server.get_uri(), autocommit=True) as connection:
            connection.execute(f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}'")
        server.cleanup()
        server, url = start_postgres(data_dir)
    return server, url


def print_table(rows: list[Row], efs: list[int]) -> None:
    print("| size | load s | index build s | HNSW p50 ms | HNSW p99 ms | exact p50 ms | exact p99 ms "
          "| recall@1 | ef_search | recall@1 vs numpy (all queries) | insert ms/face (indexed) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        for ef in efs:
            p50, p99, recall, recall_np = row.hnsw[ef]
            print(f"| {row.size:,} | {row.load_s:.1f} | {row.build_s:.1f} | {p50:.2f} | {p99:.2f} "
                  f"| {row.exact_p50:.1f} | {row.exact_p99:.1f} | {recall:.3f} (n={row.exact_queries}) | {ef} "
                  f"| {recall_np:.3f} | {row.insert_ms:.2f} |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="enrolled faces per run, comma separated")
    parser.add_argument("--queries", type=int, default=200, help="HNSW queries per size and ef_search")
    parser.add_argument("--exact-queries", type=int, default=0,
                        help="exact queries per size (default: --queries, at most 50 from 1M up)")
    parser.add_argument("--ef", default="40,100,200,400", help="hnsw.ef_search values to sweep")
    parser.add_argument("--spread", type=float, default=0.25, help="distance of a face from its subject's centre")
    parser.add_argument("--noise", type=float, default=0.25, help="distance of a query from the face it copies")
    parser.add_argument("--insert-faces", type=int, default=1000, help="faces inserted with the index in place")
    parser.add_argument("--maintenance-work-mem", default="2GB")
    parser.add_argument("--shared-buffers", default="2GB", help="'' keeps pgserver's default (128MB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="auto or cpu (default: PERCEPT_DEVICE, else auto); the face service "
                                          "refuses a GPU")
    return parser


@dataclass
class FaceRun:
    rows: list[Row]
    server_version: str
    pgvector_version: str
    settings: dict[str, str]
    device: str
    wall_s: float


def measure(args: argparse.Namespace) -> FaceRun:
    """Every size of `args.sizes` (a comma-separated string) on a fresh embedded Postgres; ValueError for a
    device the face service refuses."""
    device = facerec_device(args.device or get_settings().device)
    log(f"device: {device.description} (the face models' device; the search itself runs in Postgres)")
    sizes = [int(s) for s in args.sizes.split(",")]
    args.ef = [int(e) for e in args.ef.split(",")]
    rng = np.random.default_rng(args.seed)
    wall = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="percept-bench-faces-") as tmp:
        server, url = start_server(Path(tmp) / "db", args.shared_buffers)
        try:
            conninfo = server.get_uri()
            upgrade(url)
            with psycopg.connect(conninfo, autocommit=True) as connection:
                index_sql = connection.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s",
                                               (HNSW_INDEX,)).fetchone()
                if index_sql is None:
                    sys.exit("face_embeddings has no HNSW index: this pgserver has no pgvector")
                index_sql = index_sql[0]
                connection.execute("INSERT INTO tenants (id, name) VALUES (%s, 'bench')", (TENANT_ID,))
                connection.execute("INSERT INTO collections (id, tenant_id, name, threshold) "
                                   "VALUES (%s, %s, 'bench', 0.6)", (COLLECTION_ID, TENANT_ID))
                settings = dict(connection.execute(
                    "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN "
                    "('shared_buffers', 'max_parallel_workers_per_gather', 'work_mem')").fetchall())
                version = connection.execute(
                    "SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
                server_version = connection.execute("SHOW server_version").fetchone()[0]
            log(f"PostgreSQL {server_version}, pgvector {version}; {index_sql}")
            rows = []
            for size in sizes:
                rows.append(run_size(size, args, url, conninfo, index_sql, rng))
        finally:
            server.cleanup()
    return FaceRun(rows, server_version, version, settings, device.description, time.perf_counter() - wall)


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    try:
        run = measure(args)
    except ValueError as exc:  # a malformed device, or a GPU
        parser.error(str(exc))
    rows, server_version, version, settings, wall = (run.rows, run.server_version, run.pgvector_version,
                                                     run.settings, run.wall_s)
    device_description = run.device
    print(f"\nFace search: PostgreSQL {server_version} + pgvector {version}, HNSW m=16 ef_construction=64, "
          f"{DIM}-d unit vectors, 1-3 faces per subject (spread {args.spread}), queries {args.noise} from an "
          f"enrolled face; {settings}, maintenance_work_mem={args.maintenance_work_mem}, "
          f"max_parallel_maintenance_workers=1; percept.db.faces.HNSW_EF_SEARCH={faces.HNSW_EF_SEARCH}; "
          f"face service device {device_description}\n")
    print_table(rows, args.ef)
    print()
    largest = rows[-1]
    for ef in args.ef:
        # Judged on the lower of the two recalls: the exact-search sample can be small (50 at 1M), and the
        # numpy brute force is checked against exact search on that sample (see the notes).
        _, p99, recall, recall_np = largest.hnsw[ef]
        recall = min(recall, recall_np)
        verdict = "meets" if p99 <= P99_TARGET_MS and recall >= RECALL_TARGET else "misses"
        print(f"- {largest.size:,} faces, ef_search={ef}: p99 {p99:.1f} ms (target <= {P99_TARGET_MS:g}), "
              f"recall@1 {recall:.3f} (target >= {RECALL_TARGET}): {verdict} the targets")
    for row in rows:
        for note in row.notes or ["exact search agrees with the numpy brute force; both plans as expected"]:
            print(f"- {row.size:,}: {note}")
    print(f"- wall time {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
