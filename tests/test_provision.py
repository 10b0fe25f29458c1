"""Provisioning is idempotent, brings drifted config back, and readiness notices gaps."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy

from podium.common import streams
from podium.common.streams import TOPOLOGY, missing_streams, provision


async def test_provision_twice_is_harmless_and_complete(js: JetStreamContext) -> None:
    await provision(js)
    await provision(js)
    for spec in TOPOLOGY.streams:
        info = await js.stream_info(spec.name)
        assert info.config.retention == RetentionPolicy.LIMITS
        assert info.config.max_age == spec.max_age_s
        assert info.config.subjects == list(spec.subjects)
    for consumer in TOPOLOGY.consumers:
        ci = await js.consumer_info(consumer.stream, consumer.durable)
        assert ci.config.max_deliver == consumer.max_deliver
        assert ci.config.ack_wait == consumer.ack_wait_s
    for bucket in TOPOLOGY.buckets:
        await js.key_value(bucket.name)
    assert await missing_streams(js, tuple(s.name for s in TOPOLOGY.streams)) == []


async def test_drifted_stream_is_updated(js: JetStreamContext) -> None:
    await js.update_stream(streams.stream_config(streams.INBOUND).evolve(max_age=7200.0))
    await provision(js)
    info = await js.stream_info("INBOUND")
    assert info.config.max_age == streams.INBOUND.max_age_s


async def test_missing_stream_is_reported(js: JetStreamContext) -> None:
    await js.delete_stream("RESULTS")
    assert await missing_streams(js, ("INBOUND", "RESULTS")) == ["RESULTS"]
