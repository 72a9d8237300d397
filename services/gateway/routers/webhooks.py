"""Webhooks: subscribe a URL to job events, list and delete subscriptions, see their deliveries."""

import secrets
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from percept.db import webhooks as webhook_repo
from percept.db.ids import new_id
from percept.db.models import Webhook
from percept.db.session import session_scope
from percept.errors import InvalidInput, NotFound
from services.gateway.deps import InfraDep, TenantDep
from services.gateway.routers.jobs import ERRORS
from services.gateway.schemas import WebhookCreatedOut, WebhookDeliveryOut, WebhookIn, WebhookOut
from services.gateway.webhooks import non_public_address

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def _webhook(session, tenant_id: str, webhook_id: str) -> Webhook:
    found = webhook_repo.get_webhook(session, tenant_id, webhook_id)
    if found is None:
        raise NotFound(f"No webhook {webhook_id!r}; GET /v1/webhooks lists yours.", code="webhook_not_found")
    return found


@router.post("", status_code=201, response_model=WebhookCreatedOut, responses={**ERRORS, 422: {}})
async def create_webhook(body: WebhookIn, infra: InfraDep, tenant_id: TenantDep) -> WebhookCreatedOut:
    """Subscribe a URL to your jobs' endings. Each delivery is a POST of `{"event", "delivery_id", "job"}`
    with `Percept-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`; keep the secret."""
    def create() -> WebhookCreatedOut:
        if not infra.settings.webhook_allow_private and (address := non_public_address(body.url)):
            raise InvalidInput(f"The URL's host resolves to {address}, which is not a public address; "
                               "this platform only sends webhooks to the public internet.",
                               code="webhook_url_not_allowed", details={"address": address})
        with session_scope(infra.database_url) as session:
            webhook = webhook_repo.add_webhook(session, Webhook(
                id=new_id("whk"), tenant_id=tenant_id, url=body.url, events=body.events,
                secret="whsec_" + secrets.token_urlsafe(32)))
            session.commit()
            return WebhookCreatedOut(**WebhookOut.of(webhook).model_dump(), secret=webhook.secret)
    return await run_in_threadpool(create)


@router.get("", response_model=list[WebhookOut], responses=ERRORS)
async def list_webhooks(infra: InfraDep, tenant_id: TenantDep) -> list[WebhookOut]:
    """Your webhooks (without their secrets)."""
    def load() -> list[WebhookOut]:
        with session_scope(infra.database_url) as session:
            return [WebhookOut.of(w) for w in webhook_repo.list_webhooks(session, tenant_id)]
    return await run_in_threadpool(load)


@router.delete("/{webhook_id}", responses=ERRORS)
async def delete_webhook(webhook_id: str, infra: InfraDep, tenant_id: TenantDep) -> dict:
    """Stop sending to this URL; its pending deliveries are dropped."""
    def remove() -> dict:
        with session_scope(infra.database_url) as session:
            webhook_repo.delete_webhook(session, _webhook(session, tenant_id, webhook_id))
            session.commit()
        return {"id": webhook_id, "deleted": True}
    return await run_in_threadpool(remove)


@router.get("/{webhook_id}/deliveries", response_model=list[WebhookDeliveryOut], responses=ERRORS)
async def list_deliveries(webhook_id: str, infra: InfraDep, tenant_id: TenantDep,
                          limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[WebhookDeliveryOut]:
    """The webhook's deliveries, newest first: status, attempts and the receiver's last answer."""
    def load() -> list[WebhookDeliveryOut]:
        with session_scope(infra.database_url) as session:
            _webhook(session, tenant_id, webhook_id)
            return [WebhookDeliveryOut.of(d) for d in webhook_repo.deliveries_of(session, webhook_id, limit)]
    return await run_in_threadpool(load)
