"""Webhook subscriptions: create (with a secret shown once), list, delete, and their deliveries."""

import secrets
import socket
from collections.abc import Sequence

from sqlalchemy.orm import Session

from percept.db import webhooks as webhook_repo
from percept.db.ids import new_id
from percept.db.models import Webhook, WebhookDelivery
from percept.errors import NotFound
from percept.infra import Infra
from services.gateway.webhooks import WebhookAllow, checked_addresses


def find_webhook(session: Session, tenant_id: str, webhook_id: str) -> Webhook:
    found = webhook_repo.get_webhook(session, tenant_id, webhook_id)
    if found is None:
        raise NotFound(f"No webhook {webhook_id!r}; GET /v1/webhooks lists yours.", code="webhook_not_found")
    return found


def create_webhook(session: Session, infra: Infra, tenant_id: str, url: str, events: Sequence[str]) -> Webhook:
    """Subscribe `url` to the tenant's job endings, signed with a new secret (the answer shows it once)."""
    try:
        checked_addresses(url, WebhookAllow.of(infra.settings.webhook_allow))  # raises WebhookRefused (422)
    except (socket.gaierror, UnicodeError):
        pass  # a name that does not resolve (yet): each delivery is checked again, and fails saying why
    return webhook_repo.add_webhook(session, Webhook(id=new_id("whk"), tenant_id=tenant_id, url=url,
                                                     events=list(events), secret="whsec_" + secrets.token_urlsafe(32)))


def list_webhooks(session: Session, tenant_id: str) -> list[Webhook]:
    return webhook_repo.list_webhooks(session, tenant_id)


def delete_webhook(session: Session, tenant_id: str, webhook_id: str) -> None:
    """Stop sending to it; its pending deliveries go with it."""
    webhook_repo.delete_webhook(session, find_webhook(session, tenant_id, webhook_id))


def list_deliveries(session: Session, tenant_id: str, webhook_id: str, limit: int) -> list[WebhookDelivery]:
    """The webhook's deliveries, newest first."""
    return webhook_repo.deliveries_of(session, find_webhook(session, tenant_id, webhook_id).id, limit)
