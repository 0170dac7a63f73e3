#!/bin/sh
# The test suite starts its own PostgreSQL and Redis from the local binaries, drives
# Debian's Chromium, sandboxes evaluations with bubblewrap where it works (else with
# unshare, as root), and validates docker-compose.yml with Debian's docker-compose (which
# needs no Docker engine for `config`). Install the Debian packages when they are missing
# and we are root; otherwise name them and fail (bubblewrap is optional: its tests are
# skipped without it).
set -e
missing=""
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$missing postgresql"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
optional=""
command -v bwrap >/dev/null 2>&1 || optional="bubblewrap"
[ -z "$missing$optional" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing$missing $optional ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $missing $optional >/dev/null
    # Debian starts the packaged servers; the suite runs its own, so stop these.
    (service postgresql stop || true) >/dev/null 2>&1
    (service redis-server stop || true) >/dev/null 2>&1
    exit 0
fi
[ -n "$optional" ] && echo "Optional: apt-get install bubblewrap (sandbox tests are skipped)." >&2
[ -z "$missing" ] && exit 0
echo "The tests need:$missing. Install them, e.g. sudo apt-get install$missing" >&2
exit 1
