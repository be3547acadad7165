"""Envelope encryption and the keyring, without a broker."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import hmac
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from strata.config import load_settings
from strata.crypto import associated_data, open_sealed, seal
from strata.errors import (
    ConfigError,
    DecryptionError,
    ErasedError,
    KeyUnavailableError,
    StoreError,
)
from strata.keystore import Keyring, LocalKeystore, open_keystore
from strata.kms import LocalKms


def _ring(tmp_path: Path, **options: int) -> LocalKeystore:
    return LocalKeystore(tmp_path / "keys", tmp_path / "keys" / "master.key", **options)


def _forms(secret: bytes) -> list[bytes]:
    """The ways key material could leak: raw, hex and base64."""
    return [secret, secret.hex().encode(), base64.b64encode(secret)]


def test_a_ciphertext_moved_to_another_record_key_or_tenant_fails(
    tmp_path: Path,
) -> None:
    """Associated data binds tenant, key and event id; keys bind the tenant."""
    ring = _ring(tmp_path)
    acme = ring.primary("acme")
    globex = ring.primary("globex")
    sealed = seal(acme, b"the plan", tenant="acme", key="k1", event_id="e1")
    opened = open_sealed(
        acme, sealed.nonce, sealed.ciphertext, tenant="acme", key="k1", event_id="e1"
    )
    assert opened == b"the plan"

    moves = [
        (acme, "acme", "k2", "e1"),  # another key of the same tenant
        (acme, "acme", "k1", "e2"),  # another event of the same key
        (globex, "globex", "k1", "e1"),  # another tenant, under its own key
        (acme, "globex", "k1", "e1"),  # another tenant's record, same key material
        (ring.rotate("acme"), "acme", "k1", "e1"),  # another key version
    ]
    for key, tenant, name, event_id in moves:
        with pytest.raises(DecryptionError) as caught:
            open_sealed(
                key,
                sealed.nonce,
                sealed.ciphertext,
                tenant=tenant,
                key=name,
                event_id=event_id,
            )
        message = str(caught.value)
        assert f"event {event_id}" in message
        assert repr(tenant) in message
        assert repr(name) in message
        assert f"v{key.version}" in message
        assert "the plan" not in message


def test_content_hash_is_hmac_sha256_and_aad_is_length_prefixed(tmp_path: Path) -> None:
    """The fast paths compute exactly the documented constructions."""
    key = _ring(tmp_path).primary("acme")
    mac_key = hmac.new(key.material, b"strata/content-hash/v1", hashlib.sha256).digest()
    for plaintext in (b"", b"x", bytes(range(256)) * 40):
        expected = hmac.new(mac_key, plaintext, hashlib.sha256).digest()
        assert (
            seal(key, plaintext, tenant="acme", key="k", event_id="e").content_hash
            == expected
        )
    assert associated_data("acme", "k/é", "e1") == (
        b"strata/v1" + b"\0\0\0\x04acme" + b"\0\0\0\x04k/\xc3\xa9" + b"\0\0\0\x02e1"
    )


def test_nonces_never_repeat_across_threads_or_a_fork(tmp_path: Path) -> None:
    """Nonces come from per-thread buffers; a forked child must not reuse the
    bytes its parent's buffer still holds."""
    key = _ring(tmp_path).primary("acme")

    def nonces(count: int) -> list[bytes]:
        return [
            seal(key, b"x", tenant="acme", key="k", event_id=str(n)).nonce
            for n in range(count)
        ]

    # Partly drawn, so the parent's buffer holds nonces it has not used yet.
    seen = nonces(10)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report its nonces and leave at once
        try:
            os.write(write_end, b"".join(nonces(50)))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        from_child = pipe.read()
    os.waitpid(child, 0)
    seen += [from_child[i : i + 12] for i in range(0, len(from_child), 12)]
    assert len(from_child) == 50 * 12

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for batch in pool.map(nonces, [3000] * 4):
            seen += batch
    seen += nonces(3000)
    assert all(len(n) == 12 for n in seen)
    assert len(set(seen)) == len(seen) == 10 + 50 + 5 * 3000


def test_a_data_key_seals_only_its_own_tenant(tmp_path: Path) -> None:
    ring = _ring(tmp_path)
    with pytest.raises(ValueError, match="own tenant"):
        seal(ring.primary("acme"), b"x", tenant="globex", key="k", event_id="e")


def test_a_wrapped_key_moved_to_another_tenant_or_version_does_not_unwrap(
    tmp_path: Path,
) -> None:
    ring = _ring(tmp_path)
    ring.primary("acme")
    ring.rotate("acme")
    ring.primary("globex")
    path = tmp_path / "keys" / "keystore.json"
    doc = json.loads(path.read_text())
    acme = doc["tenants"]["acme"]["versions"]
    doc["tenants"]["globex"]["versions"]["1"]["wrapped"] = acme["1"]["wrapped"]
    acme["1"]["wrapped"] = acme["2"]["wrapped"]
    path.write_text(json.dumps(doc))

    fresh = _ring(tmp_path)
    with pytest.raises(KeyUnavailableError, match="does not unwrap"):
        fresh.data_key("globex", 1)
    with pytest.raises(KeyUnavailableError, match="does not unwrap"):
        fresh.data_key("acme", 1)
    assert fresh.data_key("acme", 2).version == 2


def test_encryptions_are_counted_durably_and_versions_rotate_early(
    tmp_path: Path,
) -> None:
    """Reservations are written before use, so the file never undercounts."""
    ring = _ring(tmp_path, rotate_after=128)
    sealed_under: dict[int, int] = {}
    for i in range(300):
        key = ring.primary("acme")
        seal(key, b"p", tenant="acme", key=f"k{i}", event_id=f"e{i}")
        sealed_under[key.version] = sealed_under.get(key.version, 0) + 1

    recorded = {i.version: i.encryptions for i in _ring(tmp_path).versions("acme")}
    assert len(sealed_under) >= 3, sealed_under
    for version, count in sealed_under.items():
        assert count <= recorded[version], (version, count, recorded)
        assert recorded[version] <= 128 + 2, recorded
    assert _ring(tmp_path).primary_version("acme") == max(recorded)

    # A process that dies leaves its unused reservation counted, never less.
    before = recorded[max(recorded)]
    other = _ring(tmp_path)
    seal(other.primary("acme"), b"p", tenant="acme", key="k", event_id="x")
    after = {i.version: i.encryptions for i in _ring(tmp_path).versions("acme")}
    assert after[max(recorded)] >= before + 1


def test_a_version_never_exceeds_its_cap(tmp_path: Path) -> None:
    ring = _ring(tmp_path, rotate_after=10, max_encryptions=40)
    held = ring.primary("acme")
    for i in range(40):
        seal(held, b"p", tenant="acme", key="k", event_id=f"e{i}")
    with pytest.raises(KeyUnavailableError, match="used all 40 encryptions"):
        seal(held, b"p", tenant="acme", key="k", event_id="e40")
    again = _ring(tmp_path, rotate_after=10, max_encryptions=40).data_key("acme", 1)
    with pytest.raises(KeyUnavailableError, match="used all 40"):
        seal(again, b"p", tenant="acme", key="k", event_id="e41")
    assert ring.primary("acme").version > 1


def test_threads_sealing_under_one_version_get_exactly_its_cap(
    tmp_path: Path,
) -> None:
    """Each reserved encryption is handed to one seal only, whatever the threads."""
    cap = 5000
    held = _ring(tmp_path, rotate_after=cap, max_encryptions=cap).primary("acme")

    def seal_until_refused(thread: int) -> int:
        done = 0
        while True:
            try:
                seal(held, b"p", tenant="acme", key="k", event_id=f"{thread}-{done}")
            except KeyUnavailableError:
                return done
            done += 1

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(seal_until_refused, range(8)))
    assert sum(counts) == cap, counts
    first = _ring(tmp_path).versions("acme")[0]
    assert (first.version, first.encryptions) == (1, cap)


def test_unwrapped_keys_are_cached_briefly_and_state_changes_win(
    tmp_path: Path,
) -> None:
    class CountingKms(LocalKms):
        unwraps = 0

        def unwrap(self, name: str, token: str, context: bytes) -> bytes:
            CountingKms.unwraps += 1
            return super().unwrap(name, token, context)

    keys = tmp_path / "keys"
    ring = Keyring(keys, CountingKms(keys, keys / "master.key"), cache_ttl_s=0.3)
    ring.primary("acme")
    ring.rotate("acme")
    time.sleep(0.35)
    first = CountingKms.unwraps
    ring.data_key("acme", 1)
    ring.data_key("acme", 1)
    assert CountingKms.unwraps == first + 1
    time.sleep(0.35)
    ring.data_key("acme", 1)
    assert CountingKms.unwraps == first + 2

    # Another process retires v1: this one stops using its cached copy at once.
    _ring(tmp_path).retire("acme", 1)
    with pytest.raises(KeyUnavailableError, match="retired"):
        ring.data_key("acme", 1)
    assert ring.has_version("acme", ring.primary("acme").key_id, 1)


def test_rollback_retire_and_shred(tmp_path: Path) -> None:
    ring = _ring(tmp_path)
    ring.primary("acme")
    assert ring.rotate("acme").version == 2
    ring.record_clearance("acme", 1)
    assert ring.versions("acme")[0].cleared_ms is not None
    ring.set_primary("acme", 1)
    assert ring.primary("acme").version == 1
    # Writes go to v1 again: its clearance no longer holds.
    assert ring.versions("acme")[0].cleared_ms is None
    assert ring.ensure_version("acme", 2, job_id="j") is False
    assert ring.ensure_version("acme", 3, job_id="j") is True
    assert ring.primary_version("acme") == 3
    with pytest.raises(KeyUnavailableError, match="cannot create 5"):
        ring.ensure_version("acme", 5, job_id="j")
    with pytest.raises(KeyUnavailableError, match="primary"):
        ring.retire("acme", 3)

    backup = tmp_path / "backup.json"
    shutil.copy(tmp_path / "keys" / "keystore.json", backup)
    erasure = ring.shred("acme")
    assert erasure.versions == [1, 2, 3]
    assert erasure.kms_key_deleted
    with pytest.raises(ErasedError):
        ring.primary("acme")
    with pytest.raises(ErasedError):
        ring.data_key("acme", 2)
    assert ring.shred("acme").erasure_id == erasure.erasure_id

    # Even a backup of the keystore taken before the erasure is useless:
    # the tenant's key-encryption key is gone from the KMS.
    shutil.copy(backup, tmp_path / "keys" / "keystore.json")
    with pytest.raises(KeyUnavailableError, match="does not exist"):
        _ring(tmp_path).data_key("acme", 2)


def test_key_material_never_shows_in_reprs_files_or_settings(tmp_path: Path) -> None:
    ring = _ring(tmp_path)
    keys = [ring.primary("acme"), ring.rotate("acme"), ring.primary("globex")]
    master = (tmp_path / "keys" / "master.key").read_bytes()
    sealed = seal(keys[0], b"a secret payload", tenant="acme", key="k", event_id="e")
    shown = " ".join(repr(x) for x in (*keys, sealed, ring, ring.kms))
    for key in keys:
        for form in _forms(key.material):
            assert form.decode(errors="ignore") not in shown
    assert "a secret payload" not in shown

    for name in ("keystore.json", "kms.json"):
        path = tmp_path / "keys" / name
        assert path.stat().st_mode & 0o777 == 0o600
        data = path.read_bytes()
        for secret in [k.material for k in keys] + [master]:
            for form in _forms(secret):
                assert form not in data, name
    assert (tmp_path / "keys" / "master.key").stat().st_mode & 0o777 == 0o600

    settings = load_settings(
        data_dir=tmp_path, kms_url="http://127.0.0.1:1", kms_token="hunter2-token"
    )
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "hunter2-token" not in text
    remote = open_keystore(settings)
    assert "hunter2-token" not in repr(remote) + repr(remote.kms)


def test_a_mistyped_master_key_path_is_refused_once_keys_exist(tmp_path: Path) -> None:
    """A missing master key file beside wrapped keys is a wrong path, not a first use."""
    from strata.config import load_settings
    from strata.keystore import open_keystore

    settings = load_settings(data_dir=tmp_path, kafka_bootstrap="127.0.0.1:1")
    assert open_keystore(settings).primary("acme").version == 1
    typo = tmp_path / "keys" / "typo.key"

    with pytest.raises(ConfigError, match="does not exist, but keys wrapped"):
        open_keystore(settings.model_copy(update={"master_key_file": typo})).data_key(
            "acme", 1
        )
    assert not typo.exists()


def _one_version(
    info: dict[str, object], *, primary: int = 1, tenant: str = "acme"
) -> dict[str, object]:
    return {
        "format": 2,
        "tenants": {
            tenant: {"key_id": "k", "primary": primary, "versions": {"1": info}}
        },
    }


def test_a_keystore_without_a_format_is_refused_saying_so(tmp_path: Path) -> None:
    _ring(tmp_path).primary("acme")
    path = tmp_path / "keys" / "keystore.json"
    doc = json.loads(path.read_text())
    del doc["format"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as raised:
        _ring(tmp_path).versions("acme")
    assert str(raised.value) == (
        f"keystore {path} has no format field (an older Strata's, or damaged); "
        "this Strata reads format 2 (start from a fresh data dir)"
    )


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ([1], "the document: expected an object, got a list"),
        ({"tenants": []}, "tenants: expected an object, got a list"),
        (
            {"tenants": {"acme": {"primary": 1, "versions": {}}}},
            "tenants.acme.key_id: missing",
        ),
        (
            {"tenants": {"acme": {"key_id": "k", "primary": "1", "versions": {}}}},
            "tenants.acme.primary: expected an integer, got a string",
        ),
        (
            {
                "tenants": {
                    "acme": {"key_id": "k", "primary": 1, "versions": {"v1": {}}}
                }
            },
            "tenants.acme.versions: key 'v1' is not a version number",
        ),
        (
            {
                "tenants": {
                    "acme": {
                        "key_id": "k",
                        "primary": 1,
                        "versions": {"1": {"state": "active", "created_ms": True}},
                    }
                }
            },
            "tenants.acme.versions.1.created_ms: expected an integer, got true or false",
        ),
        (
            _one_version({"state": "active", "created_ms": 1}),
            "tenants.acme.versions.1.wrapped: missing, and the version is active",
        ),
        (
            _one_version({"state": "paused", "created_ms": 1, "wrapped": "w"}),
            "tenants.acme.versions.1.state: 'paused' is not one of active, retired, "
            "destroyed",
        ),
        (
            _one_version(
                {"state": "active", "created_ms": 1, "wrapped": "w", "encryptions": -3}
            ),
            "tenants.acme.versions.1.encryptions: -3 is negative",
        ),
        (
            _one_version(
                {
                    "state": "active",
                    "created_ms": 1,
                    "wrapped": "w",
                    "encryptions": 2**70,
                }
            ),
            f"tenants.acme.versions.1.encryptions: {2**70} is more than a version may "
            f"ever make ({2**32})",
        ),
        (
            _one_version(
                {"state": "active", "created_ms": 1, "wrapped": "w"}, primary=2
            ),
            "tenants.acme.primary: version 2 is not among its versions",
        ),
        (
            _one_version(
                {"state": "active", "created_ms": 1, "wrapped": "w"}, tenant="a/b"
            ),
            "tenants.a/b: 'a/b' is not a tenant name",
        ),
        (b"\x00\x01binary\xff", "not UTF-8 text (byte 0xff at offset 8)"),
        (b"[" * 100_000, "nested too deeply to be read"),
        (
            b'{"tenants": ',
            "not JSON (Expecting value: line 1 column 13 (char 12))",
        ),
    ],
)
def test_a_damaged_keystore_is_refused_naming_the_file_and_field(
    tmp_path: Path, damage: object, named: str
) -> None:
    _ring(tmp_path).primary("acme")
    path = tmp_path / "keys" / "keystore.json"
    if isinstance(damage, bytes):
        path.write_bytes(damage)
    else:
        path.write_text(json.dumps(damage))
    fresh = _ring(tmp_path)
    with pytest.raises(StoreError) as raised:
        fresh.versions("acme")
    assert str(raised.value) == f"{path}: damaged: {named}"


def test_a_damaged_local_kms_file_is_refused_naming_the_field(tmp_path: Path) -> None:
    _ring(tmp_path).primary("acme")
    path = tmp_path / "keys" / "kms.json"
    doc = json.loads(path.read_text())
    name = next(iter(doc["keys"]))
    doc["keys"][name]["versions"]["1"]["wrapped"] = 7
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError) as raised:
        LocalKms(tmp_path / "keys", tmp_path / "keys" / "master.key").key_versions(name)
    assert str(raised.value) == (
        f"{path}: damaged: keys.{name}.versions.1.wrapped: expected a string, got an integer"
    )


def test_a_lost_keystore_is_not_started_afresh(tmp_path: Path) -> None:
    """keystore.json moved away while the KMS holds tenants' keys: writes and
    reads are refused naming the file, instead of new keys under the old ids
    that would leave every earlier record unreadable; restored, all is well."""
    first = _ring(tmp_path).primary("acme")
    path = tmp_path / "keys" / "keystore.json"
    aside = tmp_path / "keystore-aside.json"
    path.rename(aside)
    fresh = _ring(tmp_path)
    for use in (lambda: fresh.primary("acme"), lambda: fresh.data_key("acme", 1)):
        with pytest.raises(StoreError) as raised:
            use()
        assert str(raised.value).startswith(
            f"{path} is missing, but the KMS (local:{tmp_path / 'keys'}) holds the "
            "key of tenant 'acme' (strata-tk_"
        )
        assert "restore the keystore" in str(raised.value)
    with pytest.raises(StoreError) as raised:
        fresh.check()  # what a worker does at start, with or without events
    assert str(raised.value).startswith(
        f"{path} is missing, but the KMS (local:{tmp_path / 'keys'}) holds the "
        "keys of 1 tenant(s): restore the keystore"
    )
    assert not path.exists()
    aside.rename(path)
    assert _ring(tmp_path).data_key("acme", 1).material == first.material


def test_a_tenant_entry_lost_from_the_keystore_is_not_made_afresh(
    tmp_path: Path,
) -> None:
    """The KMS still holds the tenant's key: a new entry would strand its records."""
    ring = _ring(tmp_path)
    ring.primary("acme")
    ring.primary("globex")
    path = tmp_path / "keys" / "keystore.json"
    doc = json.loads(path.read_text())
    del doc["tenants"]["acme"]
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError) as raised:
        _ring(tmp_path).primary("acme")
    assert str(raised.value).startswith(
        f"{path} has no entry for tenant 'acme', but the KMS "
        f"(local:{tmp_path / 'keys'}) holds the key of tenant 'acme' (strata-tk_"
    )
    with pytest.raises(StoreError):
        _ring(tmp_path).data_key("acme", 1)  # reads are refused alike
    assert "acme" not in json.loads(path.read_text())["tenants"]
    _ring(tmp_path).primary("initech")  # a tenant that never had keys is fine


def test_the_report_tells_rotating_cleared_settled_and_erased_apart(
    tmp_path: Path,
) -> None:
    """A rotation whose old versions `keys verify` cleared is not 'rotating';
    an erased tenant's versions count as destroyed, not retired."""
    from strata.report import _tenant_keys

    ring = _ring(tmp_path)
    for tenant in ("settled", "rotating", "cleared", "erased"):
        ring.primary(tenant)
    for tenant in ("rotating", "cleared", "erased"):
        ring.rotate(tenant)
    ring.record_clearance("cleared", 1)
    ring.shred("erased")
    rows = {t["tenant"]: t for t in _tenant_keys(ring)}
    states = {
        tenant: (t["rotation"], t["retired_versions"], t["destroyed_versions"])
        for tenant, t in rows.items()
    }
    assert states == {
        "settled": ("settled", 0, 0),
        "rotating": ("rotating", 0, 0),
        "cleared": ("cleared, old versions not retired", 0, 0),
        "erased": ("erased", 0, 2),
    }
