#!/bin/sh
# Run by the official postgres image on first start (docker-entrypoint-initdb.d).
# POSTGRES_HOST_AUTH_METHOD=trust adds `host all all all trust`, but the `all` database
# keyword does not cover replication connections, and initdb's own replication lines only
# allow 127.0.0.1/::1 -- which never matches a client coming through a published port.
# The entrypoint restarts the server after the init scripts, so the line takes effect
# before the real server starts; pg_reload_conf() makes it effective at once anyway.
set -e
if ! grep -Eq '^[[:space:]]*host[[:space:]]+replication[[:space:]]+all[[:space:]]+all[[:space:]]+trust' "$PGDATA/pg_hba.conf"; then
    echo 'host replication all all trust' >> "$PGDATA/pg_hba.conf"
fi
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres -c 'SELECT pg_reload_conf();' > /dev/null
