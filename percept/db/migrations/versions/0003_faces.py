"""face collections, subjects and embeddings (pgvector HNSW where the extension exists)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

EMBEDDING_DIM = 128


def _use_pgvector() -> bool:
    wanted = context.config.attributes.get("pgvector")
    if wanted is False:
        return False
    available = op.get_bind().execute(
        sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first() is not None
    return available


def upgrade() -> None:
    op.create_table(
        "collections",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_collections_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collections")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_collections_tenant_id")),
    )
    op.create_table(
        "subjects",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("collection_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["collection_id"], ["collections.id"],
                                name=op.f("fk_subjects_collection_id_collections"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subjects")),
        sa.UniqueConstraint("collection_id", "name", name=op.f("uq_subjects_collection_id")),
    )
    op.create_index(op.f("ix_subjects_collection_id"), "subjects", ["collection_id"], unique=False)

    # The embedding column's type depends on the server: pgvector's `vector` (with an HNSW index for
    # fast approximate search) where the extension exists, else a plain array searched exactly.
    pgvector = _use_pgvector()
    if pgvector:
        op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    embedding_type = f"vector({EMBEDDING_DIM})" if pgvector else "double precision[]"
    op.execute(f"""
        CREATE TABLE face_embeddings (
            id bigserial CONSTRAINT pk_face_embeddings PRIMARY KEY,
            collection_id varchar(40) NOT NULL
                CONSTRAINT fk_face_embeddings_collection_id_collections REFERENCES collections(id) ON DELETE CASCADE,
            subject_id varchar(40) NOT NULL
                CONSTRAINT fk_face_embeddings_subject_id_subjects REFERENCES subjects(id) ON DELETE CASCADE,
            image_id varchar(40),
            job_id varchar(40),
            box jsonb NOT NULL DEFAULT '[]',
            embedding {embedding_type} NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.create_index("ix_face_embeddings_subject_id", "face_embeddings", ["subject_id"])
    op.create_index("ix_face_embeddings_collection_id", "face_embeddings", ["collection_id"])
    if pgvector:
        # m=16, ef_construction=64: pgvector's defaults; recall is tuned at query time (hnsw.ef_search).
        op.execute("CREATE INDEX ix_face_embeddings_embedding_hnsw ON face_embeddings "
                   "USING hnsw (embedding vector_l2_ops) WITH (m = 16, ef_construction = 64)")


def downgrade() -> None:
    op.drop_table("face_embeddings")
    op.drop_index(op.f("ix_subjects_collection_id"), table_name="subjects")
    op.drop_table("subjects")
    op.drop_table("collections")
