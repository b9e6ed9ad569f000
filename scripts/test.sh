#!/usr/bin/env bash
# Run the test suite. Sets the environment up first if needed, including Debian's chromium for the
# playground's browser test (installed with apt when missing; the test fails, never skips, without it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: chromium is missing and cannot be installed here (needs root and apt-get);" \
            "the playground browser test will fail" >&2
    fi
fi
# Debian's redis-server for the shared moderation budget's tests (a real Redis on a loopback port).
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "note: redis-server is missing and cannot be installed here (needs root and apt-get);" \
            "the shared-budget tests will fail" >&2
    fi
fi
# pytest exits 5 when it collects no test: with `set -e` that fails the run, as it should.
# Bounded: a hang (in a test or at exit) fails the run instead of stalling it.
exec timeout --kill-after=30 1500 .venv/bin/python -m pytest -q "$@"
