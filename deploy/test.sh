#!/usr/bin/env bash
# Runs NovaCron's whole test suite on this host (as root: the tests use the real /dev/kvm).
# Installs what is missing first (deploy/setup.sh). Runs no benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
# One test at a time: the tests boot real guests, and this host has two cores.
cargo test --workspace --locked -- --test-threads=1
