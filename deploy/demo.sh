#!/usr/bin/env bash
# NovaCron demo (as root, on a host with /dev/kvm): installs what is missing, builds, starts an
# agent in a temporary directory, boots a VM with the project's test guest and shows its
# state, progress and console; pauses and resumes it; restarts the agent under the running
# guest; stops and deletes it. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/setup.sh
echo "demo: building novacron-agent and novacronctl"
cargo build -q -p novacron-agent -p novacron-ctl

demo=$(mktemp -d /tmp/novacron-demo.XXXXXX)
cat > "$demo/agent.toml" <<TOML
socket = "$demo/agent.sock"
state_dir = "$demo/state"
TOML
agent_pid=
start_agent() {
    target/debug/novacron-agent run --config "$demo/agent.toml" >>"$demo/agent.log" 2>&1 &
    agent_pid=$!
    for _ in $(seq 100); do [ -S "$demo/agent.sock" ] && return; sleep 0.05; done
    echo "demo: the agent did not start:"; cat "$demo/agent.log"; exit 1
}
cleanup() {
    target/debug/novacronctl --socket "$demo/agent.sock" vm delete demo --force >/dev/null 2>&1 || true
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
ctl() { echo "\$ novacronctl $*"; target/debug/novacronctl --socket "$demo/agent.sock" "$@"; echo; }

start_agent
echo "demo: agent running (pid $agent_pid), state in $demo"
echo
ctl vm create demo --test-guest --memory 256 --cmdline "nc.rate=20000 nc.pattern=random nc.log_ms=500" --start
sleep 1.5
ctl vm list
ctl vm get demo
ctl vm guest-status demo
ctl vm pause demo
ctl vm list
ctl vm resume demo
ctl vm guest-command demo --cmd 3 --arg 0   # verify the guest's whole working set
sleep 1
ctl vm guest-status demo

echo "demo: restarting the agent; the guest keeps running"
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
sleep 1
start_agent
ctl vm get demo
ctl vm guest-status demo

ctl vm console demo --from-start
ctl vm stop demo
ctl vm list
ctl vm delete demo
echo "demo: done (logs in $demo)"
