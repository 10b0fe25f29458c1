"""Is an email's ``From:`` its real sender? DMARC-style alignment of the provider's verdicts.

SendGrid's Inbound Parse posts what its MX found, in both parsed and raw mode: ``SPF``
(the result for the envelope sender and ``sender_ip``), ``dkim`` (one ``@domain :
result`` per signature) and ``envelope`` (its ``from``, the return path). The ``From:``
header alone is forgeable; it counts as authenticated only when a passing DKIM
signature's domain, or a passing SPF check's envelope domain, is aligned with it
(the same domain or one of its parents/subdomains: DMARC's relaxed alignment, with the
organisational domain approximated by the shorter of the two names).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

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
