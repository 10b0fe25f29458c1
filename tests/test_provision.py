"""Provisioning is idempotent, brings drifted config back, and readiness notices gaps."""

from __future__ import annotations

import re
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy

from podium.common import provision as provisioning
from podium.common.errors import ProvisionError
from podium.common.provision import missing_streams, provision
from podium.contracts import streams
from podium.contracts.streams import TOPOLOGY, store_shares
from podium.testing.cluster import NatsCluster
from tests.conftest import ROOT

GIB = 1024**3


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
        # Reads are direct gets (nats-py's handle picks them from the stream's config).
        kv_stream = (await js.stream_info(f"KV_{bucket.name}")).config
        assert kv_stream.allow_direct, bucket.name
        await js.key_value(bucket.name)
    assert await missing_streams(js, tuple(s.name for s in TOPOLOGY.streams)) == []


async def test_drifted_stream_is_updated(js: JetStreamContext) -> None:
    await js.update_stream(provisioning.stream_config(streams.INBOUND).evolve(max_age=7200.0))
    await provision(js)
    info = await js.stream_info("INBOUND")
    assert info.config.max_age == streams.INBOUND.max_age_s


async def test_missing_stream_is_reported(js: JetStreamContext) -> None:
    await js.delete_stream("RESULTS")
    assert await missing_streams(js, ("INBOUND", "RESULTS")) == ["RESULTS"]


async def test_a_replica_count_the_server_cannot_hold_fails_loudly(js: JetStreamContext) -> None:
    await provision(js)
    with pytest.raises(ProvisionError, match=r"the server refused stream INBOUND: .*replicas"):
        await provision(js, replicas=3)


async def test_provisioning_again_updates_streams_buckets_and_object_stores(
    tmp_path: Path,
) -> None:
    # A real 3-node cluster: one replica of everything first, then three, then a budget.
    with NatsCluster(tmp_path / "cluster", sync_always=False) as cluster:
        await cluster.wait_ready()
        nc = await nats.connect(servers=cluster.servers)
        try:
            js = nc.jetstream()
            await provision(js, replicas=1)
            await provision(js, replicas=3, budget=8 * GIB)
            shares = store_shares()
            assert set(shares) >= {"INBOUND", "OBJ_attachments", "OBJ_transcripts"}
            for name, share in shares.items():
                config = (await js.stream_info(name)).config
                assert config.num_replicas == 3, name
                assert config.max_bytes == int(share * 8 * GIB), name
            # State must stay writable: buckets get replicas, no size limit.
            for bucket in streams.TOPOLOGY.buckets:
                config = (await js.stream_info(f"KV_{bucket.name}")).config
                assert config.num_replicas == 3, bucket.name
                assert config.max_bytes == -1, bucket.name
            # A bucket's own settings come back too, if someone changed them.
            kv = (await js.stream_info("KV_suppressions")).config
            await js.update_stream(kv.evolve(max_msgs_per_subject=1, allow_direct=False))
            await provision(js, replicas=3, budget=8 * GIB)
            kv = (await js.stream_info("KV_suppressions")).config
            assert kv.max_msgs_per_subject == streams.SUPPRESSIONS.history
            assert kv.allow_direct  # buckets made before reads were direct gets
        finally:
            await nc.close()


async def test_a_limit_below_what_a_stream_holds_is_refused(js: JetStreamContext) -> None:
    await provision(js)
    store = await js.object_store(streams.ATTACHMENTS)
    await store.put("big", b"x" * 300_000)
    # 1 MB of budget: the attachments store's share is far below what it holds now.
    with pytest.raises(ProvisionError, match=r"OBJ_attachments holds \d+ bytes, more than"):
        await provision(js, budget=1_000_000)


def test_the_storage_budget_fits_the_shipped_nats_configuration() -> None:
    shares = store_shares()
    assert all(share > 0 for share in shares.values()), shares
    assert sum(shares.values()) <= 1.0
    # Kubernetes: the budget Podium asks for fits each node's max_file_store.
    conf = (ROOT / "deploy" / "k8s" / "base" / "nats" / "nats.conf").read_text()
    match = re.search(r"max_file_store:\s*(\d+)Gi", conf)
    assert match is not None
    configmap = (ROOT / "deploy" / "k8s" / "base" / "kustomization.yaml").read_text()
    budget = re.search(r"PODIUM_STORE_BUDGET_BYTES=(\d+)", configmap)
    assert budget is not None
    assert int(budget.group(1)) <= int(match.group(1)) * GIB
