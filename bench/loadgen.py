"""The serving comparison's load generator: multipart uploads over keep-alive HTTP/1.1, with as little CPU per
request as the standard library allows.

The systems measured share the machine's cores with the load generator, so every millisecond it spends is taken
from them. httpx builds the multipart body and parses the answer in Python on every request: about 2-4 ms of CPU
per request on the 2-core bench machine, a tenth of a core at 16 clients. Here each upload's body is built once and
http.client sends it as is (about 0.5 ms per request measured there), the same for every system.

Imported by the bench scripts as `from loadgen import ...`, stdlib only.
"""

import http.client
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Upload:
    """One file as a `multipart/form-data` body, built once."""

    body: bytes
    content_type: str

    @classmethod
    def of(cls, data: bytes, field: str = "image", filename: str = "photo.jpg",
           media_type: str = "image/jpeg") -> "Upload":
        boundary = uuid.uuid4().hex
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                f"Content-Type: {media_type}\r\n\r\n").encode()
        return cls(head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}")


class HTTPError(RuntimeError):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status


class Client:
    """One keep-alive connection to `url`; `headers` go with every request. Not thread-safe: one per client
    thread. A connection the server closed is opened again once per request."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 60) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def post(self, path: str, upload: Upload) -> tuple[float, Any]:
        """POST the upload; (ms until the whole answer was read, the answer's JSON). Raises HTTPError over 399."""
        headers = {**self.headers, "Content-Type": upload.content_type}
        started = time.perf_counter()
        try:
            status, body = self._exchange(path, upload.body, headers)
        except (http.client.HTTPException, ConnectionError):  # a keep-alive connection the server had closed
            self.connection.close()
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            status, body = self._exchange(path, upload.body, headers)
        elapsed = (time.perf_counter() - started) * 1000
        if status >= 400:
            raise HTTPError(status, body)
        return elapsed, json.loads(body)

    def _exchange(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        self.connection.request("POST", path, body, headers)
        response = self.connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
