#!/usr/bin/env bash
# Install the server binaries the service tests start themselves (PostgreSQL, MariaDB, Redis),
# and Debian's chromium, which the web page's browser tests drive through Playwright.
#
# Idempotent: exits at once when the binaries are already there. Installs with apt-get only
# as root on Debian; anywhere else it prints a note (the service tests then skip, or fail
# under CI=1) and exits 0. The packages' own system services are kept from starting during
# the install (policy-rc.d) and stopped afterwards if they started anyway: the tests start
# throwaway servers of their own on 127.0.0.1.
set -uo pipefail

PACKAGES=(postgresql mariadb-server redis-server chromium)
START=$SECONDS

have_postgres() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && return 0
    done
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1
}

have() {  # a server binary on PATH or in the sbin folders (not on a non-root PATH)
    local name d
    for name in "$@"; do
        command -v "$name" >/dev/null 2>&1 && return 0
        for d in /usr/sbin /usr/local/sbin /usr/libexec; do
            [[ -x "$d/$name" ]] && return 0
        done
    done
    return 1
}

missing() {
    local m=()
    have_postgres || m+=("postgresql (initdb, pg_ctl)")
    have mariadbd mysqld || m+=("mariadb-server (mariadbd)")
    have redis-server || m+=("redis-server")
    [[ -x /usr/bin/chromium ]] || m+=("chromium")
    (( ${#m[@]} )) && printf '%s; ' "${m[@]}"
}

need=$(missing)
if [[ -z "$need" ]]; then
    echo "services: PostgreSQL, MariaDB and Redis server binaries and chromium present; nothing to install"
    exit 0
fi

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "services: missing ${need%; }; not root or no apt-get, so the service tests will be skipped"
    exit 0
fi

echo "services: missing ${need%; }; installing ${PACKAGES[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive

# Forbid service starts during the install; keep (and restore) an existing policy-rc.d.
POLICY=/usr/sbin/policy-rc.d
BACKUP=""
if [[ -e $POLICY ]]; then
    BACKUP=$(mktemp /usr/sbin/policy-rc.d.lrq-backup.XXXXXX)
    cp -p "$POLICY" "$BACKUP"
fi
restore_policy() {
    if [[ -n $BACKUP ]]; then
        mv -f "$BACKUP" "$POLICY"
    else
        rm -f "$POLICY"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\n# written by lrq tests/services/install.sh for the duration of an install\nexit 101\n' >"$POLICY"
chmod 0755 "$POLICY"

APT_OPTS=(-o DPkg::Lock::Timeout=120 -o Acquire::Retries=3 -o Acquire::http::Timeout=30)

updated=0
for attempt in 1 2; do
    if timeout 300 apt-get "${APT_OPTS[@]}" update -qq; then
        updated=1
        break
    fi
    echo "services: apt-get update failed (attempt $attempt)" >&2
done
if (( !updated )); then
    echo "services: apt-get update failed twice; cannot install ${PACKAGES[*]}" >&2
    exit 1
fi

if ! timeout 900 apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${PACKAGES[@]}"; then
    echo "services: apt-get install ${PACKAGES[*]} failed" >&2
    exit 1
fi

# If a service started anyway (no policy-rc.d support, a systemd unit), stop it: the tests run
# servers of their own and the packages' defaults would only hold ports and memory.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    timeout 60 systemctl stop postgresql mariadb redis-server >/dev/null 2>&1 || true
elif command -v service >/dev/null 2>&1; then
    for s in postgresql mariadb redis-server; do
        timeout 30 service "$s" status >/dev/null 2>&1 && timeout 30 service "$s" stop >/dev/null 2>&1
    done
fi

need=$(missing)
if [[ -n "$need" ]]; then
    echo "services: still missing after the install: ${need%; }" >&2
    exit 1
fi
echo "services: installed ${PACKAGES[*]} in $((SECONDS - START)) s"
