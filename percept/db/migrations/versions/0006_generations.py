"""generations: the provenance of every generated image and contact sheet, searchable

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "generations",
        sa.Column("image_id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("grid_id", sa.String(length=40), nullable=True),
        sa.Column("role", sa.String(length=10), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("negative_prompt", sa.Text(), nullable=True),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("style", sa.Text(), nullable=True),
        sa.Column("model_name", sa.String(length=200), nullable=True),
        sa.Column("model_version", sa.String(length=40), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("record", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_generations_image_id_images"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_generations_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_generations_job_id_jobs"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_generations")),
    )
    op.create_index("ix_generations_tenant_id_image_id", "generations", ["tenant_id", "image_id"])
    op.create_index(op.f("ix_generations_grid_id"), "generations", ["grid_id"])
    op.create_index(op.f("ix_generations_job_id"), "generations", ["job_id"])
    # A tenant's images newest first (GET /v1/images), generated or uploaded.
    op.create_index("ix_images_tenant_id_id", "images", ["tenant_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_images_tenant_id_id", table_name="images")
    op.drop_table("generations")
