#!/bin/sh
# The test suite starts its own PostgreSQL and Redis from the local binaries and drives
# Debian's Chromium. Install the Debian packages when they are missing and we are root;
# otherwise say what to install and fail.
set -e
missing=""
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$missing postgresql"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing$missing ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    # Debian starts the packaged servers; the suite runs its own, so stop these.
    (service postgresql stop || true) >/dev/null 2>&1
    (service redis-server stop || true) >/dev/null 2>&1
    exit 0
fi
echo "The tests need:$missing. Install them, e.g. sudo apt-get install$missing" >&2
exit 1
