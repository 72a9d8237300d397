"""datasets analysed by a job; the device a model was loaded on

Built-in models are no longer inserted by migrations: `percept.db.migrate.upgrade` seeds them from the
services' declarations after the migrations run.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("datasets", sa.Column("analysis_job_id", sa.String(length=40), nullable=True))
    op.create_foreign_key(op.f("fk_datasets_analysis_job_id_jobs"), "datasets", "jobs", ["analysis_job_id"], ["id"],
                          ondelete="SET NULL")
    op.alter_column("datasets", "summary", nullable=True)
    op.add_column("models", sa.Column("device", sa.String(length=120), nullable=True))


def downgrade() -> None:
    op.drop_column("models", "device")
    op.execute("DELETE FROM datasets WHERE summary IS NULL")
    op.alter_column("datasets", "summary", nullable=False)
    op.drop_constraint(op.f("fk_datasets_analysis_job_id_jobs"), "datasets", type_="foreignkey")
    op.drop_column("datasets", "analysis_job_id")
