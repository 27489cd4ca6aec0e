"""Capture from Postgres: the replication stream, the pgoutput decoder, value conversion."""
