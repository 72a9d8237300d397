"""Object storage: the same behaviour from the local directory and from S3 over real HTTP (moto's server)."""

import hashlib
import uuid

import pytest

from percept.errors import DependencyUnavailable, NotFound
from percept.storage import LocalObjectStore, S3ObjectStore, object_key_for, object_store_from_url
from tests.conftest import free_port


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """Each backend; on S3 a fresh bucket of moto's server (tests/conftest.py `s3_endpoint`), made on first use."""
    if request.param == "local":
        return object_store_from_url(tmp_path.as_uri())
    endpoint = request.getfixturevalue("s3_endpoint")
    return object_store_from_url(f"s3://testing:testing@{endpoint}/percept-{uuid.uuid4().hex[:12]}")


def test_put_get_exists_delete(store):
    data = b"\x89PNG fake image bytes"
    key = object_key_for(hashlib.sha256(data).hexdigest())
    assert not store.exists(key)
    store.put(key, data, content_type="image/png")
    assert store.exists(key) and store.get(key) == data
    store.put(key, data)  # idempotent: content-addressed
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(NotFound):
        store.get(key)
    store.ping()


def test_backends_are_chosen_by_url(tmp_path, s3_endpoint):
    assert isinstance(object_store_from_url(tmp_path.as_uri()), LocalObjectStore)
    s3 = object_store_from_url(f"s3://a:b@{s3_endpoint}/bucket?secure=false")
    assert isinstance(s3, S3ObjectStore) and s3.bucket == "bucket"
    with pytest.raises(ValueError, match="file:// or s3://"):
        object_store_from_url("ftp://somewhere/x")


def test_keys_cannot_escape_the_local_root(tmp_path):
    with pytest.raises(ValueError):
        LocalObjectStore(tmp_path / "root").put("../outside", b"x")


def test_unreachable_s3_is_a_dependency_error():
    store = object_store_from_url(f"s3://a:b@127.0.0.1:{free_port()}/bucket")
    with pytest.raises(DependencyUnavailable):
        store.put("k", b"x")


def test_put_file_streams_a_file_in_chunks(store, tmp_path):
    """Larger than a chunk locally and than one multipart part on S3; only `length` bytes are stored."""
    import os

    data = os.urandom(11 * 1024 * 1024 + 17)
    source = tmp_path / "upload.bin"
    source.write_bytes(data + b"trailing bytes that are not part of the object")
    key = object_key_for(hashlib.sha256(data).hexdigest(), prefix="datasets")
    with source.open("rb") as file:
        store.put_file(key, file, len(data), content_type="application/zip")
    assert store.exists(key) and store.get(key) == data
