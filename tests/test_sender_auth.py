"""Who sent an email: SendGrid's SPF and DKIM verdicts, aligned with the From: domain."""

from __future__ import annotations

import json

from podium.ingress.sender import aligned, judge

ENVELOPE = json.dumps({"from": "bounces@mail.example.org", "to": ["podium@example.com"]})


def test_a_passing_signature_of_the_from_domain_authenticates() -> None:
    verdict = judge("grace@example.org", "fail", "{@example.org : pass}", ENVELOPE)
    assert (verdict.result, verdict.detail) == ("pass", "DKIM pass for example.org")
    # Relaxed alignment: a signature of a parent or a subdomain counts too.
    assert judge("grace@eu.example.org", None, "{@example.org : pass}", None).result == "pass"


def test_a_passing_spf_check_counts_only_for_an_aligned_envelope_sender() -> None:
    assert judge("grace@example.org", "pass", "", ENVELOPE).result == "pass"
    other = json.dumps({"from": "x@mailer.evil.example"})
    verdict = judge("grace@example.org", "pass", "{@evil.example : pass}", other)
    assert verdict.result == "fail"
    assert "DKIM evil.example: pass" in verdict.detail
    assert "SPF pass for mailer.evil.example" in verdict.detail


def test_a_forged_from_fails_and_no_verdicts_is_none() -> None:
    assert judge("ceo@example.org", "softfail", "{@example.org : fail}", ENVELOPE).result == "fail"
    assert judge("ceo@example.org", "none", "none", None).result == "fail"
    assert judge("ceo@example.org", None, None, None).result == "none"
    # A look-alike domain is not aligned.
    assert not aligned("example.org", "badexample.org")
    assert not aligned("example.org.evil.example", "example.org")
    assert judge("ceo@example.org", None, "{@example.org.evil.example : pass}", None).result == (
        "fail"
    )
