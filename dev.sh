#!/usr/bin/env bash
# One-stop set-up for a fresh Debian machine (run as root):
#   ./dev.sh demo   install what is missing, then run the namespace lab demo
#   ./dev.sh test   install what is missing, then ruff, mypy and the whole test suite
#   ./dev.sh setup  only install (Debian packages + .venv with ftpalg and its test tools)
# Extra arguments after `test` go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(iptables nftables conntrack iproute2 procps vsftpd lftp curl wget tnftp tcpdump
              libnetfilter-queue-dev build-essential python3-venv python3-dev)

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "dev.sh: run as root (network namespaces, iptables, NFQUEUE)" >&2
        exit 1
    fi
}

install_debian_packages() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "dev.sh: installing Debian packages: ${missing[*]}"
    # Keep package scripts from starting services (vsftpd) in the host's namespace: the lab
    # starts its own servers inside its namespaces.
    local guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$guard"
        chmod +x "$guard"
    fi
    local log=/tmp/ftpalg-apt.log rc=0
    { apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        > "$log" 2>&1 || rc=$?
    [ -n "$guard" ] && rm -f "$guard"
    if [ "$rc" != 0 ]; then
        tail -n 30 "$log" >&2
        echo "dev.sh: apt-get failed (full log: $log)" >&2
        exit 1
    fi
    rm -f "$log"
}

setup_venv() {
    local py="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        "$py" -m venv .venv
    fi
    local log=.venv/pip-install.log
    if ! { .venv/bin/python -m pip install --upgrade pip &&
           .venv/bin/python -m pip install -e '.[test]'; } > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "dev.sh: pip install failed (full log: $log)" >&2
        exit 1
    fi
}

setup() {
    need_root
    install_debian_packages
    setup_venv
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    demo) setup; exec .venv/bin/ftpalg demo "$@" ;;
    test)
        setup
        .venv/bin/ruff check ftpalg tests bench
        .venv/bin/mypy
        exec .venv/bin/pytest "$@"
        ;;
    *) echo "usage: ./dev.sh demo | test [pytest args] | setup" >&2; exit 2 ;;
esac
