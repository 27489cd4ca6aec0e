"""wedsync-replicator: change-data-capture and point-in-time backup for WedSync's Postgres."""

__version__ = "0.1.0"
