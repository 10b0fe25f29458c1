"""Download links: ``GET /v1/files/<token>`` serves artifacts from the ``artifacts`` object
store to whoever holds a valid signed link, and nothing to anyone else.

The objects are put in a real JetStream object store, as a worker stores its outputs;
the links are made with :mod:`podium.common.links`, as the notifier makes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import string
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta
from nats.js.object_store import ObjectStore

from podium.cli.natsserver import NatsServer
from podium.cli.up import Layout, service_env
from podium.common import links
from podium.common.config import Secret
from podium.common.provision import provision
from podium.contracts import access, streams
from podium.ingress.files import content_disposition, media_type
from podium.ingress.service import IngressService
from podium.testing.services import in_process
from tests.conftest import NATS_PASSWORDS, nats_password_env, user_env
from tests.test_ingress import Ingress
from tests.test_ingress import settings as ingress_settings

SECRET = "link-secret-for-tests-0123456789"
HOUR = 3600


def link(name: str, *, expires_in: int = HOUR, secret: str = SECRET) -> str:
    """The path of a download link to ``name``."""
    return links.PATH + links.token(name, int(time.time()) + expires_in, secret)


@pytest.fixture
async def ingress(nats_server: NatsServer, js: JetStreamContext) -> AsyncIterator[Ingress]:
    service = IngressService(ingress_settings(nats_server, link_secret=Secret(SECRET)))
    async with (
        in_process(service, service.settings) as running,
        aiohttp.ClientSession() as http,
    ):
        yield Ingress(running, service, http)


@pytest.fixture
async def artifacts(js: JetStreamContext) -> ObjectStore:
    return await js.object_store(streams.ARTIFACTS)


async def put(store: ObjectStore, name: str, data: bytes, kind: str = "text/csv") -> None:
    """Store ``name`` as the worker does: its media type in the description."""
    await store.put(name, data, meta=ObjectMeta(name=name, description=kind))


async def get(ingress: Ingress, path: str) -> tuple[int, dict[str, str], bytes]:
    async with ingress.http.get(f"{ingress.url}{path}") as resp:
        return resp.status, dict(resp.headers), await resp.read()


def outcome(ingress: Ingress, name: str) -> float:
    value = ingress.running.health.registry.get_sample_value(
        "podium_ingress_file_links_total", {"outcome": name}
    )
    return value or 0.0


async def test_a_link_serves_the_artifact_byte_for_byte(
    ingress: Ingress, artifacts: ObjectStore
) -> None:
    # Several object-store chunks (128 KiB each), and a name that needs RFC 6266 quoting.
    data = os.urandom(300 * 1024 + 17)
    name = 'task-7/charts/Q3 "résumé";1.png'
    await put(artifacts, name, data, "image/png")
    status, headers, body = await get(ingress, link(name))
    assert status == 200
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert body == data
    assert headers["Content-Type"] == "image/png"
    assert headers["Content-Length"] == str(len(data))
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "private, no-store"
    disposition = headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="Q3 _r_sum___1.png"; ')
    assert disposition.endswith("filename*=UTF-8''" + quote('Q3 "résumé";1.png', safe=""))
    assert outcome(ingress, "served") == 1
    assert ingress.running.health.registry.get_sample_value(
        "podium_ingress_file_link_bytes_total"
    ) == len(data)


async def test_small_empty_and_untyped_objects(ingress: Ingress, artifacts: ObjectStore) -> None:
    await put(artifacts, "t1/report.csv", b"quarter,revenue\nQ3,1\n")
    await put(artifacts, "t1/empty.txt", b"", "text/plain")
    await put(artifacts, "t1/blob", b"\x00\x01", "")
    status, headers, body = await get(ingress, link("t1/report.csv"))
    assert (status, body) == (200, b"quarter,revenue\nQ3,1\n")
    assert headers["Content-Type"].startswith("text/csv")
    assert headers["Content-Disposition"] == (
        "attachment; filename=\"report.csv\"; filename*=UTF-8''report.csv"
    )
    status, headers, body = await get(ingress, link("t1/empty.txt"))
    assert (status, body, headers["Content-Length"]) == (200, b"", "0")
    status, headers, body = await get(ingress, link("t1/blob"))
    assert (status, body) == (200, b"\x00\x01")
    assert headers["Content-Type"] == "application/octet-stream"


async def test_an_expired_link_is_gone(ingress: Ingress, artifacts: ObjectStore) -> None:
    await put(artifacts, "t2/old.csv", b"a,b\n")
    status, _, body = await get(ingress, link("t2/old.csv", expires_in=-1))
    assert status == 410
    assert b"expired" in body
    assert outcome(ingress, "expired") == 1


async def test_a_tampered_link_looks_like_a_missing_file(
    ingress: Ingress, artifacts: ObjectStore
) -> None:
    await put(artifacts, "t3/secret.csv", b"salaries\n")
    await put(artifacts, "t3/other.csv", b"other\n")
    good = links.token("t3/secret.csv", int(time.time()) + HOUR, SECRET)
    encoded, expires, mac = good.split(".")
    other = links.token("t3/other.csv", int(time.time()) + HOUR, SECRET).split(".")[0]
    flipped = ("A" if mac[0] != "A" else "B") + mac[1:]
    tampered = [
        f"{encoded}.{expires}.{flipped}",  # the signature changed
        f"{encoded}.{int(expires) + HOUR}.{mac}",  # its expiry stretched
        f"{other}.{expires}.{mac}",  # another object's name, this signature
        links.token("t3/secret.csv", int(time.time()) + HOUR, "another-secret-0123456789"),
        "not-a-token",
        "a.b.c",
        "%00",
        # The same signature spelt otherwise (base64's two spare bits in its last letter).
        f"{encoded}.{expires}.{mac[:-1]}{_spare_bits_flipped(mac[-1])}",
        f"{encoded}.\u0661\u0662.{mac}",  # digits, but not ASCII ones
    ]
    missing_status, _, missing_body = await get(ingress, link("t3/never-stored.csv"))
    assert missing_status == 404
    for token in tampered:
        status, _, body = await get(ingress, links.PATH + token)
        assert (status, body) == (404, missing_body), token
    assert outcome(ingress, "invalid") == len(tampered)
    assert outcome(ingress, "missing") == 1
    # The untampered link still works.
    status, _, body = await get(ingress, links.PATH + good)
    assert (status, body) == (200, b"salaries\n")


async def test_a_link_to_a_missing_or_deleted_object_is_404(
    ingress: Ingress, artifacts: ObjectStore
) -> None:
    status, headers, body = await get(ingress, link("t4/nothing.csv"))
    assert status == 404
    assert headers["Content-Type"].startswith("application/json")
    await put(artifacts, "t4/deleted.csv", b"x")
    await artifacts.delete("t4/deleted.csv")
    status, _, deleted_body = await get(ingress, link("t4/deleted.csv"))
    assert (status, deleted_body) == (404, body)


async def test_the_token_is_never_logged(
    ingress: Ingress, artifacts: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    await put(artifacts, "t5/a.csv", b"a")
    paths = [link("t5/a.csv"), link("t5/a.csv", expires_in=-5), link("t5/none.csv")]
    with caplog.at_level(logging.DEBUG):
        for path in paths:
            await get(ingress, path)
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    for path in paths:
        token = path.removeprefix(links.PATH)
        assert token.split(".")[2] not in logged


async def test_other_methods_on_a_link_are_refused(ingress: Ingress) -> None:
    async with ingress.http.post(f"{ingress.url}{link('t6/a.csv')}") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, HEAD"


async def test_without_a_link_secret_links_are_off(
    nats_server: NatsServer, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    await put(await js.object_store(streams.ARTIFACTS), "t7/a.csv", b"a")
    service = IngressService(ingress_settings(nats_server))
    with caplog.at_level(logging.WARNING):
        async with (
            in_process(service, service.settings) as running,
            aiohttp.ClientSession() as http,
        ):
            ingress = Ingress(running, service, http)
            for secret in (SECRET, ""):
                path = link("t7/a.csv", secret=secret) if secret else links.PATH + "x.1.y"
                status, _, _ = await get(ingress, path)
                assert status == 404
            assert outcome(ingress, "disabled") == 2
    assert any("PODIUM_LINK_SECRET is not set" in r.getMessage() for r in caplog.records)


def test_a_short_link_secret_is_refused(nats_server: NatsServer) -> None:
    with pytest.raises(ValueError, match="PODIUM_LINK_SECRET"):
        ingress_settings(nats_server, link_secret=Secret("short"))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(token=st.text(st.characters(codec="utf-8", exclude_characters="/?#"), max_size=120))
async def test_fuzz_tokens_never_5xx(ingress: Ingress, token: str) -> None:
    async with ingress.http.get(f"{ingress.url}{links.PATH}{quote(token, safe='')}") as resp:
        assert resp.status in (404, 410), (resp.status, await resp.text())


def test_headers_are_safe_whatever_the_name_and_type() -> None:
    assert media_type("image/png") == "image/png"
    assert media_type("text/csv report.csv") == "text/csv"
    assert media_type("") == media_type(None) == "application/octet-stream"
    assert media_type("text/html\r\nSet-Cookie: x=1") == "text/html"
    assert media_type("not a type") == "application/octet-stream"
    for name in ("a\r\nb", 'x"y\\z', "../..", "dir/", "ça.pdf"):
        value = content_disposition(name)
        assert "\r" not in value and "\n" not in value
        assert value.count('"') == 2


# --- as the ingress's own NATS user -------------------------------------------------


@pytest.fixture
def current_accounts_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with the accounts the access module derives now (the committed
    file is regenerated from it)."""
    directory = tmp_path / "accounts-nats"
    directory.mkdir()
    (directory / "accounts.conf").write_text(access.render_accounts())
    config = directory / "nats.conf"
    config.write_text("include ./accounts.conf\n")
    env = {**os.environ, **nats_password_env()}
    server = NatsServer(directory / "jetstream", config_file=config, env=env).start()
    try:
        yield server
    finally:
        server.stop()


async def test_the_ingress_user_may_read_artifacts(current_accounts_nats: NatsServer) -> None:
    admin = await nats.connect(
        current_accounts_nats.url, user=access.ADMIN, password=NATS_PASSWORDS[access.ADMIN]
    )
    try:
        js = admin.jetstream()
        await provision(js)
        data = os.urandom(200 * 1024)
        await put(await js.object_store(streams.ARTIFACTS), "t8/big.bin", data, "image/png")
    finally:
        await admin.close()
    creds = user_env("ingress")
    service = IngressService(
        ingress_settings(
            current_accounts_nats,
            link_secret=Secret(SECRET),
            provision=False,
            nats_user=creds["PODIUM_NATS_USER"],
            nats_password=Secret(creds["PODIUM_NATS_PASSWORD"]),
        )
    )
    async with (
        in_process(service, service.settings) as running,
        aiohttp.ClientSession() as http,
    ):
        status, _, body = await get(Ingress(running, service, http), link("t8/big.bin"))
    assert (status, body == data) == (200, True)


# --- podium up --------------------------------------------------------------------------


def test_podium_up_gives_every_service_the_link_secret_and_public_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PODIUM_LINK_SECRET", raising=False)
    monkeypatch.delenv("PODIUM_PUBLIC_URL", raising=False)
    layout = Layout(tmp_path / "home", ingress_port=18080, health_base=19090)
    layout.health_ports = {s: 19090 + i for i, s in enumerate(access.SERVICES)}
    envs = {s: service_env(layout, s, "nats://127.0.0.1:4222", "t" * 32) for s in access.SERVICES}
    secrets = {env["PODIUM_LINK_SECRET"] for env in envs.values()}
    assert len(secrets) == 1
    (secret,) = secrets
    assert len(secret) >= 32
    assert {env["PODIUM_PUBLIC_URL"] for env in envs.values()} == {"http://127.0.0.1:18080"}
    # Kept in the home directory, owner-only, and the same at the next start.
    kept = layout.link_secret_file
    assert kept.read_text().strip() == secret
    assert kept.stat().st_mode & 0o777 == 0o600
    again = service_env(layout, "notifier", "nats://127.0.0.1:4222", "t" * 32)
    assert again["PODIUM_LINK_SECRET"] == secret
    # What the user set wins.
    monkeypatch.setenv("PODIUM_LINK_SECRET", "users-own-link-secret-0123456789")
    monkeypatch.setenv("PODIUM_PUBLIC_URL", "https://podium.example.com")
    mine = service_env(layout, "ingress", "nats://127.0.0.1:4222", "t" * 32)
    assert mine["PODIUM_LINK_SECRET"] == "users-own-link-secret-0123456789"
    assert mine["PODIUM_PUBLIC_URL"] == "https://podium.example.com"


def _spare_bits_flipped(letter: str) -> str:
    """Another base64url letter that decodes to the same last byte (32-byte MAC: 2 spare bits)."""
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    return alphabet[alphabet.index(letter) ^ 1]
