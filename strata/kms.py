"""Key management: the holder of the keys that wrap tenants' data keys.

A :class:`Kms` keeps named key-encryption keys (one per tenant) that never
leave it, and wraps and unwraps data keys with them. Two implementations:

- :class:`LocalKms`, the default: named keys in ``kms.json`` beside the
  keystore, each wrapped by the master key from ``STRATA_MASTER_KEY_FILE``.
- :class:`RemoteKms`, chosen by ``STRATA_KMS_URL``: a Vault-transit-like HTTP
  API (create, encrypt, decrypt, rotate, delete), called with timeouts,
  capped exponential backoff with jitter and a bounded number of attempts.

:class:`KmsServer` serves a :class:`LocalKms` over that HTTP API, for
development (``strata kms serve``) and tests.

Wrapped keys are opaque tokens ``<prefix>:v<N>:<base64>``; the context
(AEAD associated data) binds a wrapped key to what it belongs to, so a token
copied onto another tenant or version does not unwrap.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hmac
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import structlog
import tenacity
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from strata.crypto import KEY_SIZE, NONCE_SIZE
from strata.errors import (
    ConfigError,
    KeyUnavailableError,
    KmsUnavailableError,
    StoreError,
    UsageError,
)
from strata.shapes import Fields, MapOf, shape_problem

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: What the local KMS's ``kms.json`` holds; anything else is refused as damaged.
_LOCAL_KMS_SHAPE = Fields(
    {
        "keys": MapOf(
            Fields(
                {
                    "latest": int,
                    "versions": MapOf(
                        Fields({"wrapped": str}, {"created_ms": int}), digit_keys=True
                    ),
                }
            )
        )
    }
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TOKEN_RE = re.compile(
    r"^(?P<prefix>[a-z]+):v(?P<version>\d{1,9}):(?P<body>[A-Za-z0-9+/=]+)$"
)


class _NoSuchKeyError(KeyUnavailableError):
    """A named key that does not exist (the server answers 404)."""


class Kms(Protocol):
    """What the keyring needs from a key management service."""

    def describe(self) -> str:
        """Where the keys live, for receipts and logs (never credentials)."""
        ...

    def create_key(self, name: str) -> None:
        """Create the named key-encryption key if it does not exist."""
        ...

    def key_names(self) -> list[str]:
        """The names of the keys it holds; empty when it cannot list them."""
        ...

    def wrap(self, name: str, plaintext: bytes, context: bytes) -> str:
        """Encrypt key material under the latest version of the named key."""
        ...

    def unwrap(self, name: str, token: str, context: bytes) -> bytes:
        """Decrypt a wrapped key made by :meth:`wrap` with the same context."""
        ...

    def rotate_key(self, name: str) -> int:
        """Add a version to the named key for future wraps; return it."""
        ...

    def delete_key(self, name: str) -> None:
        """Destroy every version of the named key; absent keys are fine."""
        ...

    def close(self) -> None:
        """Release connections, if any."""
        ...


def check_key_name(name: str) -> str:
    """A KMS key name is 1-128 letters, digits, '.', '_' or '-'.

    Raises:
        KeyUnavailableError: the name is not acceptable.
    """
    if not _NAME_RE.fullmatch(name):
        raise KeyUnavailableError(f"KMS key name {name!r} is not acceptable")
    return name


# -- files ----------------------------------------------------------------------


def _parse_json(path: Path, data: bytes) -> Any:
    """A JSON document from a file's bytes, or a StoreError saying why not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(
            f"{path}: damaged: not UTF-8 text (byte 0x{data[exc.start]:02x} at "
            f"offset {exc.start})"
        ) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{path}: damaged: not JSON ({exc})") from None
    except RecursionError:
        raise StoreError(f"{path}: damaged: nested too deeply to be read") from None


class StateFile:
    """A JSON document in one file, shared safely between processes.

    Changes happen under an exclusive ``flock`` and are written to a
    temporary file (mode 0600), fsynced and renamed over the old one, so a
    reader sees the old document or the new one, never half of each. Readers
    reload only when the file's identity changes.

    Args:
        empty: the document of a file that does not exist yet.
        check: what is wrong with a document read from the file (naming the
            field), or None when its shape is right.
    """

    def __init__(
        self,
        path: Path,
        empty: Callable[[], dict[str, Any]],
        check: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.path = path
        self._fspath = os.fspath(path)
        self._empty = empty
        self._check = check
        self._lock_path = path.with_suffix(".lock")
        self._doc: dict[str, Any] = empty()
        self._stamp: tuple[int, int, int] | None = None
        self._mutex = threading.RLock()

    @property
    def current(self) -> dict[str, Any]:
        """The document as last read or written here, without looking at the file."""
        return self._doc

    def read(self) -> dict[str, Any]:
        """The current document (do not change it; use :meth:`update`).

        Raises:
            StoreError: the file exists but cannot be read or parsed.
        """
        with self._mutex:
            try:
                st = os.stat(self._fspath)
            except FileNotFoundError:
                self._doc, self._stamp = self._empty(), None
                return self._doc
            except OSError as exc:
                raise StoreError(f"{self.path}: {exc.strerror}") from exc
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    data = self.path.read_bytes()
                except OSError as exc:
                    raise StoreError(
                        f"{self.path}: cannot be read: {exc.strerror}"
                    ) from exc
                doc = _parse_json(self.path, data)
                problem = self._check(doc) if self._check is not None else None
                if problem is not None:
                    raise StoreError(f"{self.path}: damaged: {problem}")
                self._doc = doc
                self._stamp = stamp
            return self._doc

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, Any]]:
        """Hold the lock, yield the fresh document, and write it back on success.

        Raises:
            StoreError: the folder or file cannot be written.
        """
        with self._mutex:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise StoreError(f"{self.path.parent}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._stamp = None
                doc = json.loads(json.dumps(self.read()))
                yield doc
                self._write(doc)
            finally:
                os.close(fd)

    def _write(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            # The rename is durable only once the folder's entry is on disk.
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot be written: {exc}") from exc
        self._doc, self._stamp = doc, None


def load_or_create_master_key(path: Path, *, create: bool = True) -> bytes:
    """Read the master key, creating it (mode 0600) on first use.

    Args:
        create: False once keys wrapped by a master key exist: a missing file
            then means a wrong path, and a new key would wrap nothing they need.

    Raises:
        ConfigError: the file is missing where it must exist, is not 32 bytes,
            or is readable by others.
    """
    if not create and not path.exists():
        raise ConfigError(
            f"master key file {path} does not exist, but keys wrapped by a master "
            "key do: point STRATA_MASTER_KEY_FILE at that key"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"master key file {path}: {exc.strerror}") from exc
    else:
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(KEY_SIZE))
            out.flush()
            os.fsync(out.fileno())
    try:
        mode = path.stat().st_mode & 0o777
        material = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"master key file {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise ConfigError(
            f"master key file {path} has mode {mode:o}; it must be 0600 (chmod 600)"
        )
    if len(material) != KEY_SIZE:
        raise ConfigError(
            f"master key file {path} holds {len(material)} bytes; expected {KEY_SIZE}"
        )
    return material


# -- local ----------------------------------------------------------------------


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _seal_token(prefix: str, version: int, key: bytes, data: bytes, aad: bytes) -> str:
    nonce = os.urandom(NONCE_SIZE)
    body = nonce + AESGCM(key).encrypt(nonce, data, aad)
    return f"{prefix}:v{version}:{base64.b64encode(body).decode()}"


def _parse_token(token: str) -> tuple[int, bytes]:
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        raise KeyUnavailableError("wrapped key is not a KMS token")
    return int(match["version"]), base64.b64decode(match["body"])


class LocalKms:
    """Named key-encryption keys in a local file, wrapped by a master key.

    Layout inside its folder: ``kms.json`` (the wrapped named keys) and
    ``kms.lock``. The master key file is created on first use, mode 0600.
    """

    prefix = "strata"

    def __init__(self, directory: Path, master_key_file: Path) -> None:
        self._master_key_file = master_key_file
        self._master: bytes | None = None
        self._state = StateFile(
            directory / "kms.json",
            lambda: {"keys": {}},
            lambda doc: shape_problem(doc, _LOCAL_KMS_SHAPE),
        )

    def __repr__(self) -> str:
        return f"LocalKms({str(self._state.path.parent)!r})"

    def describe(self) -> str:
        """``local:`` and the folder of the key file."""
        return f"local:{self._state.path.parent}"

    def close(self) -> None:
        """Nothing to release: files are opened per call."""

    def key_names(self) -> list[str]:
        """The names of every key in the key file."""
        return sorted(self._state.read()["keys"])

    def create_key(self, name: str) -> None:
        """Create the named key if it does not exist."""
        check_key_name(name)
        if name in self._state.read()["keys"]:
            return
        with self._state.update() as doc:
            if name not in doc["keys"]:
                doc["keys"][name] = {"latest": 0, "versions": {}}
                self._add_version(doc["keys"][name], name)

    def rotate_key(self, name: str) -> int:
        """Add a version to the named key; later wraps use it.

        Raises:
            KeyUnavailableError: no such key.
        """
        with self._state.update() as doc:
            return self._add_version(self._entry(doc, name), name)

    def delete_key(self, name: str) -> None:
        """Destroy every version of the named key (absent keys are fine)."""
        if name not in self._state.read()["keys"]:
            return
        with self._state.update() as doc:
            doc["keys"].pop(name, None)

    def key_versions(self, name: str) -> list[int]:
        """The versions of a named key, oldest first; empty when it does not exist."""
        entry = self._state.read()["keys"].get(name)
        return sorted(int(v) for v in entry["versions"]) if entry else []

    def wrap(self, name: str, plaintext: bytes, context: bytes) -> str:
        """Encrypt under the latest version of the named key.

        Raises:
            KeyUnavailableError: no such key.
        """
        entry = self._entry(self._state.read(), name)
        version = int(entry["latest"])
        kek = self._kek(name, version, entry)
        return _seal_token(self.prefix, version, kek, plaintext, context)

    def unwrap(self, name: str, token: str, context: bytes) -> bytes:
        """Decrypt a token made by :meth:`wrap` with the same name and context.

        Raises:
            KeyUnavailableError: no such key or version, or the token does
                not authenticate (altered, or made for another context).
        """
        version, body = _parse_token(token)
        kek = self._kek(name, version, self._entry(self._state.read(), name))
        try:
            return AESGCM(kek).decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], context)
        except InvalidTag:
            raise KeyUnavailableError(
                f"wrapped key does not unwrap under KMS key {name!r} v{version}"
            ) from None

    # -- internals ---------------------------------------------------------------

    def _entry(self, doc: dict[str, Any], name: str) -> dict[str, Any]:
        entry: dict[str, Any] | None = doc["keys"].get(check_key_name(name))
        if entry is None:
            raise _NoSuchKeyError(f"KMS key {name!r} does not exist")
        return entry

    def _master_key(self) -> bytes:
        if self._master is None:
            wrapped = bool(self._state.read().get("keys"))
            self._master = load_or_create_master_key(
                self._master_key_file, create=not wrapped
            )
        return self._master

    def _add_version(self, entry: dict[str, Any], name: str) -> int:
        version = int(entry["latest"]) + 1
        wrapped = _seal_token(
            self.prefix,
            1,
            self._master_key(),
            os.urandom(KEY_SIZE),
            f"strata/kek/v1/{name}/{version}".encode(),
        )
        entry["versions"][str(version)] = {"wrapped": wrapped, "created_ms": _now_ms()}
        entry["latest"] = version
        return version

    def _kek(self, name: str, version: int, entry: dict[str, Any]) -> bytes:
        info = entry["versions"].get(str(version))
        if info is None:
            raise KeyUnavailableError(f"KMS key {name!r} has no version {version}")
        _, body = _parse_token(info["wrapped"])
        aad = f"strata/kek/v1/{name}/{version}".encode()
        try:
            return AESGCM(self._master_key()).decrypt(
                body[:NONCE_SIZE], body[NONCE_SIZE:], aad
            )
        except InvalidTag:
            raise KeyUnavailableError(
                f"KMS key {name!r} v{version} does not unwrap under the master key "
                f"in {self._master_key_file}"
            ) from None


# -- remote ---------------------------------------------------------------------


class _RetriableError(Exception):
    """An answer worth another attempt: a 5xx, a 429, a timeout, a dropped link."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class RemoteKms:
    """A client of a Vault-transit-like KMS over HTTP.

    Each call is tried up to ``max_attempts`` times; each attempt may take
    ``request_timeout_s``; between attempts the wait grows exponentially from
    ``retry_backoff_s`` up to ``retry_backoff_max_s``, with random jitter so
    many clients do not retry in step. Timeouts, dropped connections, 5xx and
    429 answers are retried; other answers are final.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        mount: str = "transit",
        request_timeout_s: float = 5.0,
        max_attempts: int = 5,
        retry_backoff_s: float = 0.2,
        retry_backoff_max_s: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigError(
                f"STRATA_KMS_URL: expected http(s)://host[:port], got {url!r}"
            )
        if max_attempts < 1:
            raise ConfigError("KMS attempts must be at least 1")
        # Credentials in the URL would end up in logs and error messages.
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._mount = mount
        self._attempts = max_attempts
        self._backoff = (retry_backoff_s, retry_backoff_max_s)
        headers = {"X-Vault-Token": token} if token else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(request_timeout_s)
        )

    def __repr__(self) -> str:
        return f"RemoteKms({self.url!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def describe(self) -> str:
        """The KMS URL, without credentials."""
        return self.url

    def health(self) -> None:
        """Check that the KMS answers.

        Raises:
            KmsUnavailableError: it did not, within the bound on attempts.
        """
        self._call("health", "GET", "/v1/sys/health")

    def key_names(self) -> list[str]:
        """Nothing: listing keys needs more than the wrap and unwrap rights
        Strata asks of a remote KMS."""
        return []

    def create_key(self, name: str) -> None:
        """Create the named key (AES-256-GCM, derived, so a context is required).

        Raises:
            KmsUnavailableError: the KMS did not answer.
        """
        body = {"type": "aes256-gcm96", "derived": True}
        self._call("create", "POST", self._path("keys", name), body)

    def wrap(self, name: str, plaintext: bytes, context: bytes) -> str:
        """Encrypt key material under the named key.

        Raises:
            KmsUnavailableError: the KMS did not answer.
            KeyUnavailableError: the KMS refused (no such key, bad request).
        """
        body = {"plaintext": _b64(plaintext), "context": _b64(context)}
        data = self._call("wrap", "POST", self._path("encrypt", name), body)
        return str(data["ciphertext"])

    def unwrap(self, name: str, token: str, context: bytes) -> bytes:
        """Decrypt a wrapped key.

        Raises:
            KmsUnavailableError: the KMS did not answer.
            KeyUnavailableError: the KMS refused (no such key, does not authenticate).
        """
        body = {"ciphertext": token, "context": _b64(context)}
        data = self._call("unwrap", "POST", self._path("decrypt", name), body)
        return base64.b64decode(data["plaintext"])

    def rotate_key(self, name: str) -> int:
        """Add a version to the named key; return the latest version.

        Raises:
            KmsUnavailableError: the KMS did not answer.
            KeyUnavailableError: no such key.
        """
        self._call("rotate", "POST", self._path("keys", name) + "/rotate")
        data = self._call("read", "GET", self._path("keys", name))
        return int(data["latest_version"])

    def delete_key(self, name: str) -> None:
        """Allow deletion of the named key, then delete it (absent keys are fine).

        Raises:
            KmsUnavailableError: the KMS did not answer.
        """
        path = self._path("keys", name)
        body = {"deletion_allowed": True}
        if self._call("config", "POST", path + "/config", body, missing_ok=True):
            self._call("delete", "DELETE", path, missing_ok=True)

    # -- internals ---------------------------------------------------------------

    def _path(self, kind: str, name: str) -> str:
        return f"/v1/{self._mount}/{kind}/{quote(check_key_name(name), safe='')}"

    def _call(
        self,
        op: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        missing_ok: bool = False,
    ) -> dict[str, Any]:
        """One call, retried; the answer's ``data``, or ``{}`` for a tolerated 404."""
        began = time.monotonic()
        initial, cap = self._backoff

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "kms.retry",
                kms=self.url,
                op=op,
                attempt=state.attempt_number,
                error=str(error),
                consequence=f"retrying; gives up after {self._attempts} attempts",
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_RetriableError),
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=tenacity.wait_exponential_jitter(
                multiplier=initial, max=cap, jitter=initial
            ),
            before_sleep=before_sleep,
            reraise=False,
        )
        try:
            result: dict[str, Any] = retrying(
                self._attempt, op, method, path, body, missing_ok
            )
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            waited = time.monotonic() - began
            raise KmsUnavailableError(
                f"KMS at {self.url} did not answer {op} after {self._attempts} "
                f"attempts in {waited:.1f}s; last error: {last}"
            ) from last
        return result

    def _attempt(
        self,
        op: str,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        missing_ok: bool,
    ) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            raise _RetriableError(f"{type(exc).__name__}: no answer in time") from exc
        except httpx.TransportError as exc:
            raise _RetriableError(f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status == 429 or status >= 500:
            raise _RetriableError(f"HTTP {status}: {_errors(response)}")
        if status in (401, 403):
            raise ConfigError(
                f"KMS at {self.url} refused {op} (HTTP {status}): "
                "check STRATA_KMS_TOKEN"
            )
        if status == 404 and missing_ok:
            return {}
        if status >= 400:
            raise KeyUnavailableError(
                f"KMS at {self.url} refused {op} (HTTP {status}): {_errors(response)}"
            )
        if not response.content:
            return {"ok": True}
        try:
            payload = response.json()
        except ValueError as exc:
            raise _RetriableError(f"HTTP {status}: the answer is not JSON") from exc
        data: dict[str, Any] = payload.get("data") or {"ok": True}
        return data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _errors(response: httpx.Response) -> str:
    """The KMS's own error words, never the request body (it holds key material)."""
    try:
        errors = response.json().get("errors")
    except ValueError:
        errors = None
    return "; ".join(str(e) for e in errors)[:300] if errors else response.reason_phrase


# -- server ---------------------------------------------------------------------


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/v1/sys/health$"), "health"),
    ("POST", re.compile(r"^/v1/transit/keys/(?P<name>[^/]+)$"), "create"),
    ("GET", re.compile(r"^/v1/transit/keys/(?P<name>[^/]+)$"), "read"),
    ("DELETE", re.compile(r"^/v1/transit/keys/(?P<name>[^/]+)$"), "delete"),
    ("POST", re.compile(r"^/v1/transit/keys/(?P<name>[^/]+)/rotate$"), "rotate"),
    ("POST", re.compile(r"^/v1/transit/keys/(?P<name>[^/]+)/config$"), "config"),
    ("POST", re.compile(r"^/v1/transit/encrypt/(?P<name>[^/]+)$"), "encrypt"),
    ("POST", re.compile(r"^/v1/transit/decrypt/(?P<name>[^/]+)$"), "decrypt"),
]


#: How long the KMS server keeps an idle client connection open.
IDLE_CONNECTION_S = 5.0


class KmsRequestHandler(BaseHTTPRequestHandler):
    """Answers the Vault-transit-like API from the server's :class:`LocalKms`."""

    server: KmsHTTPServer
    protocol_version = "HTTP/1.1"
    #: Seconds a kept-alive connection may sit idle. Closing the server waits
    #: for every connection's thread, so a client that keeps one open and
    #: idle would otherwise hold the server up for as long as it lives.
    timeout = IDLE_CONNECTION_S

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        # Paths name keys, never material; bodies are never logged.
        log.debug("kms.request", client=self.client_address[0], line=format % args)

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        token = self.server.token
        given = self.headers.get("X-Vault-Token") or ""
        public = method == "GET" and self.path == "/v1/sys/health"
        if token is not None and not public and not hmac.compare_digest(given, token):
            self._answer(HTTPStatus.FORBIDDEN, {"errors": ["permission denied"]})
            return
        for route_method, pattern, op in _ROUTES:
            match = pattern.match(self.path)
            if match and route_method == method:
                try:
                    body = json.loads(raw) if raw else {}
                    status, answer = self._handle(
                        op, match.groupdict().get("name"), body
                    )
                except KeyUnavailableError as exc:
                    missing = isinstance(exc, _NoSuchKeyError)
                    status = HTTPStatus.NOT_FOUND if missing else HTTPStatus.BAD_REQUEST
                    answer = {"errors": [str(exc)]}
                except (ValueError, KeyError, TypeError) as exc:
                    status, answer = (
                        HTTPStatus.BAD_REQUEST,
                        {"errors": [f"bad request: {type(exc).__name__}"]},
                    )
                except StoreError as exc:
                    status, answer = (
                        HTTPStatus.INTERNAL_SERVER_ERROR,
                        {"errors": [str(exc)]},
                    )
                self._answer(status, answer)
                return
        self._answer(
            HTTPStatus.NOT_FOUND, {"errors": [f"no route {method} {self.path}"]}
        )

    def _handle(
        self, op: str, name: str | None, body: dict[str, Any]
    ) -> tuple[HTTPStatus, dict[str, Any] | None]:
        kms = self.server.kms
        if op == "health":
            return HTTPStatus.OK, {"initialized": True, "sealed": False}
        assert name is not None
        if op == "create":
            kms.create_key(name)
            return HTTPStatus.NO_CONTENT, None
        if op == "read":
            versions = kms.key_versions(name)
            if not versions:
                raise _NoSuchKeyError(f"KMS key {name!r} does not exist")
            return HTTPStatus.OK, {
                "data": {
                    "name": name,
                    "latest_version": versions[-1],
                    "type": "aes256-gcm96",
                }
            }
        if op == "delete":
            kms.delete_key(name)
            return HTTPStatus.NO_CONTENT, None
        if op == "rotate":
            kms.rotate_key(name)
            return HTTPStatus.NO_CONTENT, None
        if op == "config":
            # Deletion needs no opt-in here; answer 404 for absent keys as Vault does.
            if not kms.key_versions(name):
                raise _NoSuchKeyError(f"KMS key {name!r} does not exist")
            return HTTPStatus.NO_CONTENT, None
        context = base64.b64decode(body["context"])
        if op == "encrypt":
            token = kms.wrap(name, base64.b64decode(body["plaintext"]), context)
            return HTTPStatus.OK, {"data": {"ciphertext": token}}
        plaintext = kms.unwrap(name, str(body["ciphertext"]), context)
        return HTTPStatus.OK, {"data": {"plaintext": _b64(plaintext)}}

    def _answer(self, status: HTTPStatus, body: dict[str, Any] | None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class KmsHTTPServer(ThreadingHTTPServer):
    """The HTTP server behind :class:`KmsServer`."""

    # Closing waits for requests in flight rather than cutting them off.
    daemon_threads = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        kms: LocalKms,
        token: str | None,
    ) -> None:
        super().__init__(address, handler)
        self.kms = kms
        self.token = token


class KmsServer:
    """A small Vault-transit-like KMS over HTTP, serving a :class:`LocalKms`.

    For development and tests: plain HTTP on loopback by default. Use as a
    context manager to serve from a background thread::

        with KmsServer(LocalKms(folder, folder / "master.key")) as server:
            kms = RemoteKms(server.url)
    """

    def __init__(
        self,
        kms: LocalKms,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        handler: type[BaseHTTPRequestHandler] = KmsRequestHandler,
    ) -> None:
        """Bind the address; serving starts with :meth:`start`.

        Raises:
            UsageError: the address cannot be bound or its host resolved.
        """
        try:
            self._server = KmsHTTPServer((host, port), handler, kms, token)
        except OSError as exc:  # socket.gaierror too: a host that does not resolve
            raise UsageError(
                f"KMS address {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self._thread: threading.Thread | None = None

    @property
    def kms(self) -> LocalKms:
        """The KMS this server answers from."""
        return self._server.kms

    @property
    def url(self) -> str:
        """The base URL clients use."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`close` is called from another."""
        log.info("kms.serving", url=self.url)
        self._server.serve_forever(poll_interval=0.2)

    def start(self) -> None:
        """Serve from a daemon thread."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="strata-kms", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        log.info("kms.stopped", url=self.url)

    def __enter__(self) -> KmsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
