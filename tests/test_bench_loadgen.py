"""The serving bench's load generator (bench/loadgen.py) against a real HTTP server: the upload arrives as a
multipart file part byte for byte, the connection is kept alive and opened again once the server closes it, and
an error answer is raised, not counted as a result."""

import hashlib
import json
import threading
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.loadgen import Client, HTTPError, Upload


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the systems measured answer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        parts = [{"name": part.get_param("name", header="content-disposition"), "filename": part.get_filename(),
                  "type": part.get_content_type(), "sha256": hashlib.sha256(part.get_payload(decode=True)).hexdigest()}
                 for part in message.iter_parts()]
        answer = json.dumps({"parts": parts, "client_port": self.client_address[1],
                             "authorization": self.headers.get("Authorization")}).encode()
        self.send_response(422 if self.path == "/refuse" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_upload_arrives_as_one_file_part(server_url: str) -> None:
    jpeg = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n"
    with Client(server_url, {"Authorization": "Bearer k"}) as client:
        latency, answer = client.post("/classify", Upload.of(jpeg))
    assert latency > 0
    assert answer["parts"] == [{"name": "image", "filename": "photo.jpg", "type": "image/jpeg",
                                "sha256": hashlib.sha256(jpeg).hexdigest()}]
    assert answer["authorization"] == "Bearer k"


def test_one_connection_is_kept_and_opened_again_when_the_server_closes_it(server_url: str) -> None:
    upload = Upload.of(b"x" * 1000)
    with Client(server_url) as client:
        ports = [client.post("/classify", upload)[1]["client_port"] for _ in range(3)]
        closing = client.post("/close", upload)[1]["client_port"]
        after = client.post("/classify", upload)[1]["client_port"]
    assert len(set(ports)) == 1 and closing == ports[0]
    assert after != ports[0]


def test_an_error_answer_is_raised(server_url: str) -> None:
    with Client(server_url) as client, pytest.raises(HTTPError) as raised:
        client.post("/refuse", Upload.of(b"x"))
    assert raised.value.status == 422
