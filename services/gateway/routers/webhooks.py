"""Webhooks: subscribe a URL to job events, list and delete subscriptions, see their deliveries."""

from typing import Annotated

from fastapi import APIRouter, Query, Request

from percept.schemas import ErrorOut, WebhookCreatedOut, WebhookDeliveryOut, WebhookIn, WebhookOut
from services.gateway.deps import InfraDep, SessionDep, TenantDep
from services.gateway.routers.jobs import ERRORS
from services.gateway.transaction import after_commit
from services.gateway.usecases import webhooks

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", status_code=201, response_model=WebhookCreatedOut, responses={**ERRORS, 422: {"model": ErrorOut}})
def create_webhook(body: WebhookIn, request: Request, session: SessionDep, infra: InfraDep,
                   tenant_id: TenantDep) -> WebhookCreatedOut:
    """Subscribe a URL to your jobs' endings. Each delivery is a POST of `{"event", "delivery_id", "job"}`
    with `Percept-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`; keep the secret."""
    webhook = webhooks.create_webhook(session, infra, tenant_id, body.url, body.events)
    after_commit(session, request.app.state.webhook_sender.webhooks_changed)
    return WebhookCreatedOut(**WebhookOut.of(webhook).model_dump(), secret=webhook.secret)


@router.get("", response_model=list[WebhookOut], responses=ERRORS)
def list_webhooks(session: SessionDep, tenant_id: TenantDep) -> list[WebhookOut]:
    """Your webhooks (without their secrets)."""
    return [WebhookOut.of(w) for w in webhooks.list_webhooks(session, tenant_id)]


@router.delete("/{webhook_id}", responses=ERRORS)
def delete_webhook(webhook_id: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """Stop sending to this URL; its pending deliveries are dropped."""
    webhooks.delete_webhook(session, tenant_id, webhook_id)
    return {"id": webhook_id, "deleted": True}


@router.get("/{webhook_id}/deliveries", response_model=list[WebhookDeliveryOut], responses=ERRORS)
def list_deliveries(webhook_id: str, session: SessionDep, tenant_id: TenantDep,
                    limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[WebhookDeliveryOut]:
    """The webhook's deliveries, newest first: status, attempts and the receiver's last answer."""
    return [WebhookDeliveryOut.of(d) for d in webhooks.list_deliveries(session, tenant_id, webhook_id, limit)]
