"""Is an email's ``From:`` its real sender? DMARC-style alignment of the provider's verdicts.

SendGrid's Inbound Parse posts what its MX found, in both parsed and raw mode: ``SPF``
(the result for the envelope sender and ``sender_ip``), ``dkim`` (one ``@domain :
result`` per signature) and ``envelope`` (its ``from``, the return path). The ``From:``
header alone is forgeable; it counts as authenticated only when a passing DKIM
signature's domain, or a passing SPF check's envelope domain, is aligned with it
(the same domain or one of its parents/subdomains: DMARC's relaxed alignment, with the
organisational domain approximated by the shorter of the two names).

In raw mode the ingress has the message's bytes, and verifies its DKIM signatures
itself (:func:`verify_dkim`, with dkimpy) instead of taking the provider's word: a body
changed after signing fails here whatever the provider posted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import dkim

log = logging.getLogger(__name__)

#: Looks up a DNS TXT record (dkimpy's ``dnsfunc``: the name, with its trailing dot, in
#: bytes; the record or None). Injected in tests, which run offline.
DnsFunc = Callable[..., bytes | None]
#: Signatures verified per message at most (each may cost a DNS lookup).
MAX_SIGNATURES = 5

_DKIM = re.compile(r"@?([A-Za-z0-9.-]+)\s*:\s*([A-Za-z]+)")


@dataclass(frozen=True)
class Verdict:
    """``pass`` (aligned and passing), ``fail`` (verdicts, none aligned and passing) or
    ``none`` (the provider posted no verdicts); and why, for the conductor and the logs."""

    result: str
    detail: str


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(">").lower().rstrip(".")


def aligned(a: str, b: str) -> bool:
    """Relaxed alignment: the same domain, or one is a subdomain of the other."""
    if not a or not b:
        return False
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def judge(sender: str, spf: str | None, dkim: str | None, envelope: str | None) -> Verdict:
    """The verdict on ``sender`` (the ``From:`` address) from SendGrid's fields."""
    if spf is None and dkim is None:
        return Verdict("none", "the provider posted no SPF or DKIM verdict")
    domain = _domain(sender)
    signed = [(d.lower().rstrip("."), r.lower()) for d, r in _DKIM.findall(dkim or "")]
    passing = [d for d, result in signed if result == "pass"]
    if any(aligned(domain, d) for d in passing):
        return Verdict("pass", f"DKIM pass for {next(d for d in passing if aligned(domain, d))}")
    envelope_from = ""
    try:
        parsed = json.loads(envelope or "{}")
        envelope_from = str(parsed.get("from") or "") if isinstance(parsed, dict) else ""
    except ValueError:
        envelope_from = ""
    spf_result = (spf or "").strip().split(maxsplit=1)[0].lower() if (spf or "").strip() else ""
    if spf_result == "pass" and aligned(domain, _domain(envelope_from)):
        return Verdict("pass", f"SPF pass for {_domain(envelope_from)}")
    shown = ", ".join(f"{d}: {r}" for d, r in signed) or "no signature"
    return Verdict(
        "fail",
        f"From: {domain or '?'} is not authenticated (DKIM {shown}; SPF {spf_result or 'none'}"
        f" for {_domain(envelope_from) or '?'})",
    )


def verify_dkim(message: bytes, dnsfunc: DnsFunc | None = None) -> list[tuple[str, str]]:
    """Each DKIM signature of ``message`` (up to :data:`MAX_SIGNATURES`) as (signing
    domain, ``pass`` or ``fail``), verified with dkimpy; [] when it has none."""
    lookup: DnsFunc = dnsfunc or dkim.dnsplug.get_txt
    try:
        checker = dkim.DKIM(message, minkey=1024)
    except dkim.DKIMException as err:
        # Headers dkimpy cannot read: nothing it signed can be checked, so nothing passes.
        log.info("DKIM: message not readable", extra={"error": str(err)[:200]})
        return []
    count = sum(1 for name, _ in checker.headers if name.lower() == b"dkim-signature")
    results: list[tuple[str, str]] = []
    for index in range(min(count, MAX_SIGNATURES)):
        checker.domain = None
        checker.signature_fields = {}
        try:
            passed = bool(checker.verify(idx=index, dnsfunc=lookup))
        except Exception as err:  # noqa: BLE001 - hostile input: DKIMException, and dns
            # (a label too long), binascii (a bad bh=) and others dkimpy lets through.
            log.info("DKIM signature not verified", extra={"error": repr(err)[:200]})
            passed = False
        if passed and b"l" in checker.signature_fields:
            # l= signs only the first bytes of the body: anything may follow them.
            passed = False
        domain = checker.domain.decode("ascii", "replace") if checker.domain else "?"
        results.append((domain.lower().rstrip("."), "pass" if passed else "fail"))
    return results


def as_verdicts(results: list[tuple[str, str]]) -> str:
    """:func:`verify_dkim`'s results in the shape of SendGrid's ``dkim`` field."""
    return " ".join(f"{{@{domain} : {result}}}" for domain, result in results)
