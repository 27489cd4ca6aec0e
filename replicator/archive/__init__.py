"""Everything stored: the formats of every object, their names, and the reader (below both
the running sink and replay; imports no Kafka client)."""
