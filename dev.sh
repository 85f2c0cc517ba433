#!/usr/bin/env bash
# One-stop set-up for a fresh Debian machine (run as root):
#   ./dev.sh demo   install what is missing, then run the namespace lab demo
#   ./dev.sh test   install what is missing, then ruff, mypy and the whole test suite
#   ./dev.sh bench  install what is missing (and matplotlib), then the benchmark suite (~12 min)
#   ./dev.sh setup  only install (Debian packages + .venv with ftpalg and its test tools)
# Extra arguments after `test` go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(iptables nftables conntrack conntrackd iproute2 procps vsftpd lftp curl wget tnftp
              tcpdump libnetfilter-queue-dev build-essential python3-venv python3-dev
              openssl)  # openssl: the certificate of the lab's FTPS server

# The lab's FTP servers. vsftpd (above) is installed normally; proftpd and pure-ftpd conflict
# with it as packages (all provide ftp-server), so their .debs are only unpacked into
# LAB_PKG_DIR (one directory per package), never dpkg-installed: no maintainer scripts, no
# daemons, nothing in /etc. ftpalg/lab/servers.py finds the binaries there. Their shared
# libraries do not conflict and are installed normally. `rm -rf .lab-pkgs` to refresh.
LAB_PKG_DIR=.lab-pkgs
LAB_DEBS=(proftpd-core pure-ftpd)
APT_PACKAGES+=(libhiredis0.14 libmemcached11 libmemcachedutil2 libpcre2-posix3 libsodium23)
# firewalld: tests/test_netns_firewalls.py runs the real one inside a lab gateway's namespace
# (on a private D-Bus bus); the host never runs it, see mask_host_firewalld.
APT_PACKAGES+=(firewalld)
# systemd: tests/test_packaging.py checks the installed unit with systemd-analyze verify, and
# tests/test_systemd.py boots it as PID 1 of a container around a lab namespace (never on the
# host; ftpalg/lab/systemd.py). Every other program the suite needs is in the lists
# above or Essential (util-linux: setpriv, unshare): in CI (CI=true) a missing one fails its
# test instead of skipping it (tests/needs.py).
APT_PACKAGES+=(systemd)
# man-db: tests/test_docgen.py and test_packaging.py render the manual pages and find them by
# name where `ftpalg install` puts them (`man -M STAGE/usr/local/share/man ftpalg`).
APT_PACKAGES+=(man-db)
# tayga: the NAT64 lab's translator (ftpalg/lab/nat64.py runs it in a gateway's namespace, in
# the foreground; the package's init script is installed disabled, K01 in every runlevel, and
# the guard below keeps the install from starting it). python3-twisted: the NAT64 lab's server
# without EPSV (Twisted's FTP server, run with the system python3).
APT_PACKAGES+=(tayga python3-twisted)
# docker.io: tests/test_netns_docker.py and the demo run Debian's Docker engine inside a lab
# namespace (ftpalg/lab/docker.py); the host never runs it, see mask_host_docker.
APT_PACKAGES+=(docker.io)

# The same for docker.io: its units would start dockerd in the host's namespace (and its
# FORWARD policy DROP with it). The lab starts /usr/sbin/dockerd itself, inside a namespace.
mask_host_docker() {
    command -v systemctl > /dev/null || return 0
    systemctl --quiet disable docker.service docker.socket > /dev/null 2>&1 || true
    systemctl --quiet mask docker.service docker.socket > /dev/null 2>&1 || true
}

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
    for p in "${missing[@]}"; do
        [ "$p" = firewalld ] && mask_host_firewalld
        [ "$p" = docker.io ] && mask_host_docker
    done
    return 0
}

# The firewalld package enables its unit: with systemd, the host would run it at the next boot
# (or on D-Bus activation) and it would take over the host's firewall. Masked when dev.sh
# installed it (an admin's own firewalld is left alone); the lab starts /usr/sbin/firewalld
# itself, inside its namespaces, which masking does not affect.
mask_host_firewalld() {
    command -v systemctl > /dev/null || return 0
    systemctl --quiet disable firewalld.service > /dev/null 2>&1 || true  # also works without systemd running
    systemctl --quiet mask firewalld.service > /dev/null 2>&1 || true
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

unpack_lab_servers() {
    local missing=() p
    for p in "${LAB_DEBS[@]}"; do
        [ -e "$LAB_PKG_DIR/$p/.unpacked" ] || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "dev.sh: unpacking into $LAB_PKG_DIR/: ${missing[*]}"
    local tmp log=/tmp/ftpalg-apt.log deb
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true  # apt-get download runs as _apt
    if ! ( cd "$tmp" && apt-get download "${missing[@]}" ) > "$log" 2>&1 &&
       ! { apt-get update -qq && ( cd "$tmp" && apt-get download "${missing[@]}" ); } > "$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "dev.sh: apt-get download failed (full log: $log)" >&2
        rm -rf "$tmp"
        exit 1
    fi
    rm -f "$log"
    mkdir -p "$LAB_PKG_DIR"
    for p in "${missing[@]}"; do
        deb=$(echo "$tmp/${p}"_*.deb)
        rm -rf "$LAB_PKG_DIR/$p" "$LAB_PKG_DIR/$p.tmp"
        dpkg-deb -x "$deb" "$LAB_PKG_DIR/$p.tmp"
        basename "$deb" > "$LAB_PKG_DIR/$p.tmp/.unpacked"
        mv "$LAB_PKG_DIR/$p.tmp" "$LAB_PKG_DIR/$p"
    done
    rm -rf "$tmp"
}

setup() {
    need_root
    install_debian_packages
    unpack_lab_servers
    setup_venv
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    demo) setup; exec .venv/bin/ftpalg demo "$@" ;;
    bench)
        setup
        if ! .venv/bin/python -m pip install -e '.[test,bench]' > .venv/pip-bench.log 2>&1; then
            tail -n 20 .venv/pip-bench.log >&2
            echo "dev.sh: pip install of the bench extra failed (the suite runs without its plot)" >&2
        fi
        exec .venv/bin/python bench/suite.py "$@"
        ;;
    test)
        setup
        .venv/bin/ruff check ftpalg tests bench
        .venv/bin/mypy
        exec .venv/bin/pytest "$@"
        ;;
    *) echo "usage: ./dev.sh demo | test [pytest args] | bench [suite args] | setup" >&2; exit 2 ;;
esac
