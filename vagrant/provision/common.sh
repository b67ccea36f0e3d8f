#!/bin/sh
# Every node: Docker from Debian, and meshd from the package the host built
# (`cargo xtask package` writes it to target/debian). The package installs the unit and
# /etc/default/meshd (its default arguments suit Debian 12: containers under system.slice),
# enables meshd and starts it; the role scripts restart it once the node is in the swarm.
set -eu
export DEBIAN_FRONTEND=noninteractive
if ! command -v dockerd >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io
fi
# MESHD_PACKAGES: where the package is (the package test provisions from elsewhere).
packages=${MESHD_PACKAGES:-/meshd/target/debian}
set -- "$packages"/meshd_*.deb
if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
  echo "no meshd package in $packages: run 'cargo xtask package' at the repository root first" >&2
  exit 1
fi
# An operator's edited /etc/default/meshd is kept on re-provisioning.
apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$1"
