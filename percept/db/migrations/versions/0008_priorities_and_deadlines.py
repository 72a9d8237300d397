"""tenants have a priority (high, normal, low) their jobs are queued with; a job may have a deadline
(`Cancel-After`) past which it is canceled

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("priority", sa.String(10), nullable=False, server_default="normal"))
    op.create_check_constraint("priority", "tenants", "priority IN ('high', 'normal', 'low')")
    op.add_column("jobs", sa.Column("priority", sa.String(10), nullable=False, server_default="normal"))
    op.add_column("jobs", sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
    # The sweeper's deadline pass reads only pending jobs that have a deadline.
    op.create_index("ix_jobs_deadline_at", "jobs", ["deadline_at"],
                    postgresql_where=sa.text("deadline_at IS NOT NULL AND status IN ('queued', 'running')"))
    # The backlog gauges (GET /metrics) count pending jobs per queue and find each queue's oldest queued job.
    op.create_index("ix_jobs_queue_pending", "jobs", ["queue", "status", "queued_at"],
                    postgresql_where=sa.text("status IN ('queued', 'running')"))


def downgrade() -> None:
    op.drop_index("ix_jobs_queue_pending", table_name="jobs")
    op.drop_index("ix_jobs_deadline_at", table_name="jobs")
    op.drop_column("jobs", "deadline_at")
    op.drop_column("jobs", "priority")
    op.drop_constraint("ck_tenants_priority", "tenants", type_="check")
    op.drop_column("tenants", "priority")
