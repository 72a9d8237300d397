"""Settings: what a production start refuses (placeholder secrets, embedded infrastructure), and the
settings' own notations."""

import pytest
from pydantic import ValidationError

from percept.config import Settings

REAL = {"database_url": "postgresql+psycopg://percept:q8Rt2vLx9Wm4Zp7s@db.internal:5432/percept",
        "broker_url": "redis://:Jf83hSxk2Pq9Lm4T@redis.internal:6379/0",
        "storage_url": "s3://AKIAEXAMPLE7Q2:Xb9f2LwQ8mZr4Tk7Yv3N@s3.internal:9000/percept?secure=true"}


@pytest.fixture(autouse=True)
def _no_percept_environment(monkeypatch):
    """Only what each test passes: nothing from the environment the tests were started in."""
    import os

    for name in list(os.environ):
        if name.startswith("PERCEPT_"):
            monkeypatch.delenv(name)


def production(**overrides: str) -> Settings:
    return Settings(environment="production", **{**REAL, **overrides})


def refusal(**overrides: str) -> str:
    with pytest.raises(ValidationError) as refused:
        production(**overrides)
    return str(refused.value)


def test_development_is_the_default_and_takes_the_shipped_examples():
    settings = Settings(database_url="postgresql+psycopg://percept:CHANGE-ME@db/percept",
                        storage_url="s3://percept:percept-dev-secret@minio:9000/percept?secure=false")
    assert settings.environment == "development"


def test_production_takes_real_secrets():
    assert production().environment == "production"
    assert production(database_url="postgresql+psycopg://percept@db.internal/percept",  # a password from elsewhere
                      broker_url="redis://redis.internal:6379/0").environment == "production"


@pytest.mark.parametrize(("field", "value"), [
    # k8s/secret.yaml's placeholders
    ("database_url", "postgresql+psycopg://percept:CHANGE-ME@postgres.percept.svc.cluster.local:5432/percept"),
    ("broker_url", "redis://:CHANGE-ME@redis.percept.svc.cluster.local:6379/0"),
    ("storage_url", "s3://CHANGE-ME-ACCESS-KEY:CHANGE-ME-SECRET-KEY@minio.percept.svc.cluster.local:9000/percept"),
    ("storage_url", "s3://CHANGE-ME-ACCESS-KEY:Xb9f2LwQ8mZr4Tk7Yv3N@minio:9000/percept"),
    # docker-compose.yml's defaults
    ("storage_url", "s3://percept:percept-dev-secret@minio:9000/percept?secure=false"),
    ("database_url", "postgresql+psycopg://percept:percept@postgres:5432/percept"),
    # and their like
    ("database_url", "postgresql+psycopg://app:changethis@db/app"),
    ("database_url", "postgresql+psycopg://app:ChangeMe123@db/app"),
    ("database_url", "postgresql+psycopg://app:change%2Dme@db/app"),
    ("database_url", "postgresql+psycopg://postgres:Password@db/app"),
    ("broker_url", "redis://default:secret@redis:6379/0"),
    ("storage_url", "s3://minioadmin:minioadmin@minio:9000/percept"),
    ("metrics_token", "changeme"),
])
def test_production_refuses_placeholder_secrets_and_says_what_to_set(field, value):
    message = refusal(**{field: value})
    variable = f"PERCEPT_{field.upper()}"
    assert variable in message and f"set {variable}" in message
    assert "PERCEPT_ENVIRONMENT=production" in message


def test_every_placeholder_is_named_at_once():
    message = refusal(database_url="postgresql+psycopg://percept:CHANGE-ME@db/percept",
                      storage_url="s3://percept:percept-dev-secret@minio:9000/percept")
    assert "PERCEPT_DATABASE_URL" in message and "PERCEPT_STORAGE_URL" in message
    assert "PERCEPT_BROKER_URL" not in message


def test_the_refusal_repeats_no_secret():
    message = refusal(database_url="postgresql+psycopg://app:letmein@db/app")
    assert "letmein" not in message and "Xb9f2LwQ8mZr4Tk7Yv3N" not in message  # nor the other settings' input


@pytest.mark.parametrize("field", ["database_url", "broker_url", "storage_url"])
def test_production_does_not_fall_back_to_embedded_infrastructure(field):
    settings = {**REAL, field: None}
    with pytest.raises(ValidationError, match=f"PERCEPT_{field.upper()}"):
        Settings(environment="production", **settings)


def test_the_environment_is_read_from_percept_environment(monkeypatch):
    monkeypatch.setenv("PERCEPT_ENVIRONMENT", "production")
    monkeypatch.setenv("PERCEPT_DATABASE_URL", "postgresql+psycopg://percept:CHANGE-ME@db/percept")
    monkeypatch.setenv("PERCEPT_BROKER_URL", REAL["broker_url"])
    monkeypatch.setenv("PERCEPT_STORAGE_URL", REAL["storage_url"])
    with pytest.raises(ValidationError, match="PERCEPT_DATABASE_URL"):
        Settings()
    monkeypatch.setenv("PERCEPT_ENVIRONMENT", "staging")
    with pytest.raises(ValidationError, match="development|production"):
        Settings()


def test_trusted_proxies_are_addresses_or_networks():
    assert Settings(trusted_proxies="10.0.0.0/8, 127.0.0.5").trusted_proxies == ["10.0.0.0/8", "127.0.0.5/32"]
    assert Settings().trusted_proxies == []  # X-Forwarded-For is believed from no one by default
    with pytest.raises(ValidationError, match="PERCEPT_TRUSTED_PROXIES"):
        Settings(trusted_proxies="proxy.internal")


def test_the_wrong_key_limit_is_a_rate():
    assert Settings().auth_failure_limit == "20/minute"
    assert Settings(auth_failure_limit="").auth_failure_limit is None
    with pytest.raises(ValidationError, match="is not a rate"):
        Settings(auth_failure_limit="lots")
