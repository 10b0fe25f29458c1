"""Loop-local metrics expose exactly what prometheus_client's own classes would."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from podium.common.metrics import LATENCY_BUCKETS, LoopCounter, LoopHistogram

CREATED = re.compile(rb"_created\{[^}]*\} [0-9.e+]+\n")

observations = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=1000, allow_nan=False),
        # Exactly on a bound: a bucket's bound is inclusive (``le``).
        st.sampled_from([float(b) for b in LATENCY_BUCKETS]),
    ),
    max_size=40,
)


def exposition(registry: CollectorRegistry) -> bytes:
    # Creation times differ by a few microseconds between the two registries.
    return CREATED.sub(b"_created{} T\n", generate_latest(registry))


@given(observations, st.lists(st.sampled_from(["a", "b", "c"]), max_size=20))
def test_same_exposition_as_prometheus_client(values: list[float], routes: list[str]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LoopCounter("x_requests_total", "Requests", ["route", "status"], ours)
    reference_counter = Counter(
        "x_requests_total", "Requests", ["route", "status"], registry=theirs
    )
    histogram = LoopHistogram("x_seconds", "Latency", ["route"], ours, buckets=LATENCY_BUCKETS)
    reference_histogram = Histogram(
        "x_seconds", "Latency", ["route"], buckets=LATENCY_BUCKETS, registry=theirs
    )
    for i, route in enumerate(routes):
        counter.labels(route, "200").inc()
        reference_counter.labels(route, "200").inc()
        if i % 3 == 0:
            counter.labels(route, "503").inc(2)
            reference_counter.labels(route, "503").inc(2)
    for i, value in enumerate(values):
        route = routes[i % len(routes)] if routes else "a"
        histogram.labels(route).observe(value)
        reference_histogram.labels(route).observe(value)
    assert exposition(ours) == exposition(theirs)


def test_read_back_by_sample_name() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("x_total", "X", ["kind"], registry)
    counter.labels("a").inc()
    counter.labels("a").inc(2.5)
    histogram = LoopHistogram("y_seconds", "Y", [], registry, buckets=(0.1, 1))
    for value in (0.05, 0.1, 0.5, 7):
        histogram.labels().observe(value)
    assert registry.get_sample_value("x_total", {"kind": "a"}) == 3.5
    assert registry.get_sample_value("y_seconds_bucket", {"le": "0.1"}) == 2
    assert registry.get_sample_value("y_seconds_bucket", {"le": "+Inf"}) == 4
    assert registry.get_sample_value("y_seconds_sum") == pytest.approx(7.65)


def test_bad_use_is_refused() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("x_total", "X", ["kind"], registry)
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError, match="Duplicated"):
        LoopCounter("x_total", "X again", ["kind"], registry)
