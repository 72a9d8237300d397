"""webhooks may subscribe to `job.progress`: a delivery per progress change of a running job, at most one pending

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A delivery carries the job as it is when it is sent, so one pending `job.progress` delivery per (webhook,
    # job) is enough: progress written while it waits is sent with it, and a 150-step generation does not queue
    # 150 deliveries.
    op.execute("""
        CREATE FUNCTION percept_job_progress_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO webhook_deliveries (webhook_id, job_id, event, status, attempts)
            SELECT w.id, NEW.id, 'job.progress', 'pending', 0
            FROM webhooks w
            WHERE w.tenant_id = NEW.tenant_id AND 'job.progress' = ANY (w.events)
              AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                              WHERE d.webhook_id = w.id AND d.job_id = NEW.id AND d.event = 'job.progress'
                                AND d.status = 'pending');
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER jobs_progress_webhooks AFTER UPDATE OF progress ON jobs FOR EACH ROW
        WHEN (NEW.status = 'running' AND OLD.progress IS DISTINCT FROM NEW.progress)
        EXECUTE FUNCTION percept_job_progress_webhooks()""")


def downgrade() -> None:
    op.execute("DELETE FROM webhook_deliveries WHERE event = 'job.progress'")
    op.execute("DROP TRIGGER jobs_progress_webhooks ON jobs")
    op.execute("DROP FUNCTION percept_job_progress_webhooks()")
