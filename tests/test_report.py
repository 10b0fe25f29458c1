"""The worker report parser: the seed's Status/Summary/Details, and answers without it."""

from __future__ import annotations

from podium.worker.report import parse_report


def test_standard_report() -> None:
    report = parse_report(
        "I did the thing.\n\nStatus: COMPLETE\nSummary: Wrote the memo\nDetails:\nLine 1\nLine 2\n"
    )
    assert (report.status, report.summary, report.details) == (
        "COMPLETE",
        "Wrote the memo",
        "Line 1\nLine 2",
    )
    assert report.structured


def test_last_status_wins_and_markdown_is_tolerated() -> None:
    report = parse_report(
        "Format: Status: COMPLETE|FAILED\n...\n**Status:** NEEDS_INPUT\n**Summary:** Which "
        "region?\n**Details:** EU or US?"
    )
    assert report.status == "NEEDS_INPUT"
    assert report.summary == "Which region?"
    assert report.details == "EU or US?"


def test_answer_without_report_is_kept_whole() -> None:
    report = parse_report("Here is the summary you asked for.\nIt has two lines.")
    assert report.status == "COMPLETE"
    assert not report.structured
    assert report.details == "Here is the summary you asked for.\nIt has two lines."
    assert report.summary == "Here is the summary you asked for."


def test_failed_with_details_before_the_report() -> None:
    report = parse_report(
        "Tried three times, the site is down.\nStatus: FAILED\nSummary: Site down"
    )
    assert report.status == "FAILED"
    assert report.details == "Tried three times, the site is down."
