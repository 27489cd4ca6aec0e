"""The local stack of real services (`replicator dev`): Postgres 15 and 18, Kafka, S3, Azure
Blob and GCS emulators, run natively on 127.0.0.1 for development and the test suite."""
