"""a job records its reuse key (tenant-independent digest of kind, resolved parameters, model version, seed and
input sha256s), so an equal deterministic request is answered from the earlier job's result

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("reuse_key", sa.String(64), nullable=True))
    # Submission looks up the tenant's newest succeeded job of a key.
    op.create_index("ix_jobs_reuse", "jobs", ["tenant_id", "reuse_key"],
                    postgresql_where=sa.text("reuse_key IS NOT NULL AND status = 'succeeded'"))
    # A reused job is inserted already ended: its webhooks go out as a worker-ended job's do (0004's function).
    op.execute("""
        CREATE TRIGGER jobs_inserted_ended_webhooks AFTER INSERT ON jobs FOR EACH ROW
        WHEN (NEW.status IN ('succeeded', 'failed', 'canceled'))
        EXECUTE FUNCTION percept_job_ended_webhooks()""")


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_inserted_ended_webhooks ON jobs")
    op.drop_index("ix_jobs_reuse", table_name="jobs")
    op.drop_column("jobs", "reuse_key")
