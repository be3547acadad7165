"""The remote KMS client against a real local HTTP server that fails, hangs and recovers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import ClassVar

import pytest
import structlog

from strata.crypto import open_sealed, seal
from strata.errors import ConfigError, ErasedError, KeyUnavailableError
from strata.keystore import Keyring
from strata.kms import (
    KmsRequestHandler,
    KmsServer,
    KmsUnavailableError,
    LocalKms,
    RemoteKms,
)

HANG_S = 1.0


class FaultyHandler(KmsRequestHandler):
    """Serves the real API, but first plays the next scripted fault, if any."""

    faults: ClassVar[list[str]] = []
    calls: ClassVar[list[str]] = []

    def _dispatch(self, method: str) -> None:
        FaultyHandler.calls.append(f"{method} {self.path}")
        fault = FaultyHandler.faults.pop(0) if FaultyHandler.faults else None
        if fault == "fail":
            self.close_connection = True
            self._answer(
                HTTPStatus.SERVICE_UNAVAILABLE, {"errors": ["Vault is sealed"]}
            )
        elif fault == "drop":
            self.close_connection = True  # no answer at all: the link just closes
        elif fault == "hang":
            time.sleep(HANG_S)
            self.close_connection = True
        else:
            super()._dispatch(method)


_CLIENTS: list[RemoteKms] = []


@pytest.fixture
def server(tmp_path: Path) -> Iterator[KmsServer]:
    FaultyHandler.faults = []
    FaultyHandler.calls = []
    kms = LocalKms(tmp_path / "kms", tmp_path / "kms" / "master.key")
    with KmsServer(kms, token="root-token", handler=FaultyHandler) as running:
        yield running
        while _CLIENTS:
            _CLIENTS.pop().close()


def _client(server: KmsServer, **options: object) -> RemoteKms:
    settings: dict[str, object] = {
        "token": "root-token",
        "request_timeout_s": 0.3,
        "max_attempts": 4,
        "retry_backoff_s": 0.02,
        "retry_backoff_max_s": 0.1,
    }
    settings.update(options)
    client = RemoteKms(server.url, **settings)  # type: ignore[arg-type]
    _CLIENTS.append(client)
    return client


def test_round_trip_rotation_and_deletion(server: KmsServer, tmp_path: Path) -> None:
    kms = _client(server)
    kms.create_key("strata-t1")
    kms.create_key("strata-t1")
    token = kms.wrap("strata-t1", b"k" * 32, b"ctx")
    assert token.startswith("strata:v1:")
    assert kms.unwrap("strata-t1", token, b"ctx") == b"k" * 32
    with pytest.raises(KeyUnavailableError, match="HTTP 400"):
        kms.unwrap("strata-t1", token, b"another context")
    assert kms.rotate_key("strata-t1") == 2
    assert kms.wrap("strata-t1", b"k" * 32, b"ctx").startswith("strata:v2:")
    assert kms.unwrap("strata-t1", token, b"ctx") == b"k" * 32
    kms.delete_key("strata-t1")
    kms.delete_key("strata-t1")
    with pytest.raises(KeyUnavailableError, match="HTTP 404"):
        kms.unwrap("strata-t1", token, b"ctx")

    # The keyring works over it unchanged.
    ring = Keyring(tmp_path / "keys", kms)
    sealed = seal(ring.primary("acme"), b"hello", tenant="acme", key="k", event_id="e")
    again = Keyring(tmp_path / "keys", _client(server)).data_key("acme", 1)
    assert (
        open_sealed(
            again, sealed.nonce, sealed.ciphertext, tenant="acme", key="k", event_id="e"
        )
        == b"hello"
    )
    assert ring.rotate("acme").version == 2


def test_transient_failures_are_retried_until_it_answers(server: KmsServer) -> None:
    kms = _client(server)
    kms.create_key("strata-t1")
    FaultyHandler.calls.clear()
    FaultyHandler.faults = ["fail", "drop", "fail"]
    with structlog.testing.capture_logs() as logs:
        token = kms.wrap("strata-t1", b"k" * 32, b"ctx")
    assert len(FaultyHandler.calls) == 4
    retries = [e for e in logs if e["event"] == "kms.retry"]
    assert [e["attempt"] for e in retries] == [1, 2, 3]
    assert all("consequence" in e for e in retries)
    assert kms.unwrap("strata-t1", token, b"ctx") == b"k" * 32


def test_a_hanging_kms_times_out_per_attempt_then_recovers(server: KmsServer) -> None:
    kms = _client(server)
    kms.create_key("strata-t1")
    FaultyHandler.calls.clear()
    FaultyHandler.faults = ["hang", "hang"]
    began = time.monotonic()
    kms.wrap("strata-t1", b"k" * 32, b"ctx")
    took = time.monotonic() - began
    assert len(FaultyHandler.calls) == 3
    # Two attempts cut off at the 0.3 s timeout, not at the 1 s hang.
    assert 0.6 <= took < 1.6, took


def test_it_gives_up_after_the_bound_with_a_clear_error(server: KmsServer) -> None:
    kms = _client(server, max_attempts=3)
    FaultyHandler.faults = ["fail"] * 10
    began = time.monotonic()
    with pytest.raises(KmsUnavailableError) as caught:
        kms.wrap("strata-t1", b"k" * 32, b"ctx")
    took = time.monotonic() - began
    message = str(caught.value)
    assert server.url in message
    assert "did not answer wrap after 3 attempts" in message
    assert "HTTP 503" in message
    assert "Vault is sealed" in message
    assert caught.value.retriable
    assert isinstance(caught.value, KeyUnavailableError)
    assert len(FaultyHandler.calls) == 3
    assert took < 1.0, took

    # Hanging every time: each attempt is cut at the timeout; the total is bounded.
    FaultyHandler.faults = ["hang"] * 10
    kms = _client(server, max_attempts=2, request_timeout_s=0.2)
    began = time.monotonic()
    with pytest.raises(KmsUnavailableError, match="ReadTimeout"):
        kms.wrap("strata-t1", b"k" * 32, b"ctx")
    assert time.monotonic() - began < 1.0


def test_backoff_is_capped(server: KmsServer) -> None:
    """Six attempts: uncapped doubling from 0.1 s would sleep 3.1 s in all."""
    kms = _client(server, max_attempts=6, retry_backoff_s=0.1, retry_backoff_max_s=0.15)
    FaultyHandler.faults = ["fail"] * 10
    began = time.monotonic()
    with pytest.raises(KmsUnavailableError, match="after 6 attempts"):
        kms.create_key("strata-t1")
    assert time.monotonic() - began < 1.5


def test_nobody_listening_is_retried_then_reported() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kms = RemoteKms(f"http://127.0.0.1:{port}", max_attempts=3, retry_backoff_s=0.01)
    with pytest.raises(KmsUnavailableError, match="ConnectError"):
        kms.create_key("strata-t1")
    kms.close()


def test_refusals_are_final_and_name_the_setting(server: KmsServer) -> None:
    kms = _client(server, token="wrong-token")
    with pytest.raises(ConfigError, match="STRATA_KMS_TOKEN") as caught:
        kms.create_key("strata-t1")
    assert len(FaultyHandler.calls) == 1
    assert "wrong-token" not in str(caught.value)
    with pytest.raises(ConfigError, match="STRATA_KMS_URL"):
        RemoteKms("ftp://somewhere")
    masked = RemoteKms("http://user:pw@127.0.0.1:1/")
    assert "pw" not in repr(masked)
    assert "pw" not in masked.describe()


def test_the_keyring_rides_out_an_outage_on_its_cache(
    server: KmsServer, tmp_path: Path
) -> None:
    ring = Keyring(tmp_path / "keys", _client(server, max_attempts=2), cache_ttl_s=0.5)
    ring.primary("acme")
    FaultyHandler.faults = ["fail", "fail"]
    assert ring.primary("acme").version == 1  # from the cache: no call
    time.sleep(0.55)
    with pytest.raises(KmsUnavailableError):
        ring.data_key("acme", 1)
    assert ring.data_key("acme", 1).version == 1  # the KMS is back


def test_shred_with_the_kms_down_destroys_locally_and_finishes_later(
    server: KmsServer, tmp_path: Path
) -> None:
    ring = Keyring(tmp_path / "keys", _client(server, max_attempts=2))
    key_id = ring.primary("acme").key_id
    FaultyHandler.faults = ["fail", "fail"]
    first = ring.shred("acme")
    assert not first.kms_key_deleted
    with pytest.raises(ErasedError):
        ring.data_key("acme", 1)
    assert "wrapped" not in (tmp_path / "keys" / "keystore.json").read_text()

    again = ring.shred("acme")
    assert again.kms_key_deleted
    assert again.erasure_id == first.erasure_id
    assert server.kms.key_versions(f"strata-{key_id}") == []
