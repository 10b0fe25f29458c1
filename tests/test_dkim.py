"""Raw-mode email: the ingress verifies DKIM signatures itself (dkimpy), DNS injected."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import aiohttp
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.ingress import sender
from podium.ingress.service import IngressService
from podium.testing.sendgrid import multipart_body
from podium.testing.services import in_process
from tests.test_ingress import SENDGRID_AUTH, Ingress, settings, stored

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIVATE_PEM = KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
PUBLIC_DER = KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
#: The DNS TXT record of selector "s1" of example.org, as the test's resolver answers it.
RECORD = b"v=DKIM1; k=rsa; p=" + base64.b64encode(PUBLIC_DER)
LOOKUPS: list[bytes] = []
OWN = "podium@example.com"


def dns(name: bytes, timeout: int = 5) -> bytes | None:
    """The test's DNS: one key record, nothing else (and no network)."""
    LOOKUPS.append(name)
    return RECORD if name.rstrip(b".") == b"s1._domainkey.example.org" else None


def signed(
    body: str, *, domain: str = "example.org", selector: bytes = b"s1", length: bool = False
) -> bytes:
    message = (
        "From: The CEO <ceo@example.org>\r\n"
        "To: podium@example.com\r\n"
        "Subject: Quarterly numbers\r\n"
        "Message-ID: <q3@example.org>\r\n"
        "Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n"
        "\r\n"
        f"{body}\r\n"
    ).encode()
    signature: bytes = dkim.sign(
        message,
        selector,
        domain.encode(),
        PRIVATE_PEM,
        include_headers=[b"from", b"to", b"subject", b"message-id", b"date"],
        length=length,
    )
    return signature + message


def test_a_good_signature_passes_and_a_changed_body_fails() -> None:
    message = signed("Please send the Q3 figures to the board.")
    assert sender.verify_dkim(message, dns) == [("example.org", "pass")]
    changed = message.replace(b"the board", b"my private address")
    assert sender.verify_dkim(changed, dns) == [("example.org", "fail")]
    # No key published for the signing domain: a failure, not an error.
    other = signed("hello", domain="example.net")
    assert sender.verify_dkim(other, dns) == [("example.net", "fail")]
    assert sender.verify_dkim(b"From: a@example.org\r\n\r\nunsigned\r\n", dns) == []


def test_hostile_signatures_fail_and_never_break_the_check() -> None:
    # A selector no DNS name can hold (dnspython refuses it before any lookup).
    long_selector = signed("hello", selector=b"s" * 80)
    assert sender.verify_dkim(long_selector, dns) == [("example.org", "fail")]
    # With the real resolver, which raises on such a name before asking anyone.
    assert sender.verify_dkim(long_selector) == [("example.org", "fail")]
    empty_label = signed("hello", selector=b"a..b")
    assert sender.verify_dkim(empty_label, dns) == [("example.org", "fail")]
    # l= signs only the first bytes of the body: text appended after them would pass.
    partial = signed("Approve the transfer.", length=True) + b"And the second one.\r\n"
    assert sender.verify_dkim(partial, dns) == [("example.org", "fail")]
    # Headers dkimpy cannot read.
    assert sender.verify_dkim(b"\x00o: x\r\n\r\nbody", dns) == []


@pytest.fixture
async def ingress(nats_server: NatsServer, js: JetStreamContext) -> AsyncIterator[Ingress]:
    service = IngressService(settings(nats_server), dkim_dns=dns)
    async with (
        in_process(service, service.settings) as running,
        aiohttp.ClientSession() as http,
    ):
        yield Ingress(running, service, http)


async def post_raw(ingress: Ingress, message: bytes, verdicts: dict[str, str]) -> None:
    body, content_type = multipart_body(
        [
            ("email", message, None, None),
            ("envelope", json.dumps({"from": "ceo@example.org", "to": [OWN]}), None, None),
            *((name, value, None, None) for name, value in verdicts.items()),
        ]
    )
    async with ingress.http.post(
        f"{ingress.url}/webhooks/sendgrid/inbound",
        data=body,
        headers={**SENDGRID_AUTH, "Content-Type": content_type},
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert "ignored" not in await resp.json()


async def test_raw_mail_is_judged_by_the_signatures_we_verify(
    ingress: Ingress, js: JetStreamContext
) -> None:
    LOOKUPS.clear()
    # SendGrid says pass both times (its MX saw the message as signed); no SPF helps.
    verdicts = {"SPF": "none", "dkim": "{@example.org : pass}"}
    good = signed("Please send the Q3 figures to the board.")
    await post_raw(ingress, good, verdicts)
    tampered = (
        signed("Please send the Q3 figures to the board.")
        .replace(b"the board", b"my private address")
        .replace(b"<q3@example.org>", b"<q3-changed@example.org>")
    )
    await post_raw(ingress, tampered, verdicts)
    first, second = await stored(js, expect=2)
    assert (first.sender, first.sender_auth) == ("ceo@example.org", "pass")
    assert first.sender_auth_detail == "DKIM pass for example.org"
    # The body was changed after signing: whatever the provider says, not authenticated.
    assert (second.sender, second.sender_auth) == ("ceo@example.org", "fail")
    assert "example.org: fail" in second.sender_auth_detail
    # The key came from the injected DNS (the test runs offline), once per message.
    assert [name.rstrip(b".") for name in LOOKUPS] == [b"s1._domainkey.example.org"] * 2
