"""Tenants and their API keys. Keys are shown once and stored as sha256 hashes."""

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from percept.db.ids import new_id
from percept.db.models import ApiKey, Priority, Tenant

KEY_PREFIX = "pk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenant_named(session: Session, name: str) -> Tenant:
    """The tenant of that name, created if new."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str) -> tuple[Tenant, str]:
    """A new key for the tenant of that name (created if new). Returns the key in clear, once."""
    tenant = tenant_named(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10]))
    return tenant, key


def tenant_id_for_key(session: Session, key: str) -> str | None:
    return session.scalar(
        select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))


def set_priority(session: Session, name: str, priority: Priority) -> bool:
    """The priority the tenant's new jobs are queued at (jobs already queued keep theirs); False: no such tenant."""
    result = session.execute(update(Tenant).where(Tenant.name == name).values(priority=priority.value))
    return bool(getattr(result, "rowcount", 0))
