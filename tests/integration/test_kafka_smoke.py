"""The local Kafka broker serves an idempotent producer and a consumer group with commits."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.metadata import MetadataRequest


async def test_produce_consume_commit_and_end_offsets(kafka_bootstrap: str,
                                                      topic_prefix: str) -> None:
    topic = f"{topic_prefix}.critical"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                enable_idempotence=True, compression_type="zstd")
    await producer.start()
    try:
        for i in range(30):
            await producer.send(topic, f"change-{i}".encode(), key=f"wedding-{i % 7}".encode())
        await producer.flush()
    finally:
        await producer.stop()

    partitions = [TopicPartition(topic, p) for p in range(3)]
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=topic,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        seen: list[bytes] = []
        while len(seen) < 30:
            batch = await consumer.getmany(timeout_ms=2000)
            assert batch, "no records arrived within 2 s"
            for records in batch.values():
                seen.extend(r.value for r in records if r.value is not None)
        await consumer.commit()
        end = await consumer.end_offsets(partitions)
        committed = {tp: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()

    assert sorted(seen) == sorted(f"change-{i}".encode() for i in range(30))
    assert sum(end.values()) == 30
    assert committed == end

    # A new member of the same group resumes from the committed offsets: nothing is re-read.
    again = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=topic,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    await again.start()
    try:
        assert await again.getmany(timeout_ms=1500) == {}
    finally:
        await again.stop()


async def test_automatic_topic_creation_is_off(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}.never-created"
    client = AIOKafkaClient(bootstrap_servers=kafka_bootstrap)
    await client.bootstrap()
    try:
        # This request would create the topic if the broker allowed automatic creation.
        node = client.get_random_node()
        assert node is not None
        await client.send(node, MetadataRequest([topic], allow_auto_topic_creation=True))
    finally:
        await client.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert topic not in await admin.list_topics()
    finally:
        await admin.close()
