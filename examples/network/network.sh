#!/usr/bin/env bash
# keymig over the network: two networked clusters in two "regions" on
# loopback ports, 4 HSM daemons (keymig hsm serve), a migration between them
# from clients that hold only client directories, and a cross-region sync of
# the target to a clone.
#
#   1. a customer CA (rehearsal; a real one lives offline);
#   2. two clusters of 2 HSMs, CloudHSM's way: CSR, signed, certificates issued;
#   3. a clone of the target, made from its backup, for disaster recovery;
#   4. 4 daemons, one per HSM, over mutual TLS;
#   5. client directories: what an application host needs, no HSM file;
#   6. keys on the source, a plan, a migration, a verification;
#   7. synckey from the target to its clone;
#   8. SIGTERM: the daemons drain and exit 0.
#
# Usage: KEYMIG=/path/to/keymig examples/network/network.sh   (default: keymig on PATH)
set -euo pipefail
umask 077

KEYMIG=${KEYMIG:-keymig}
work=$(mktemp -d "${TMPDIR:-/tmp}/keymig-network.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

step() { printf '\n== %s\n' "$*"; }

# wait_ready FILE N: wait until a daemon's ready file names N HSMs (a
# marker the daemon writes once it listens), at most a minute.
wait_ready() {
  for _ in $(seq 600); do
    if [ -f "$1" ] && [ "$(grep -c '^serving HSM' "$1")" -ge "$2" ]; then return 0; fi
    sleep 0.1
  done
  echo "no daemon wrote $1" >&2
  exit 1
}

step "1. a customer CA in $work/ca"
"$KEYMIG" hsm ca create --dir ca

step "2. two networked clusters: east (us-east-1) and west (eu-west-1), 2 HSMs each"
export KEYMIG_PIN=admin:network-admin
for c in east:us-east-1 west:eu-west-1; do
  name=${c%%:*} region=${c#*:}
  # Port 0: each HSM gets a free port the first time it is served.
  "$KEYMIG" hsm init --dir "$name" --region "$region" --hsms 2 \
    --addresses 127.0.0.1:0,127.0.0.1:0 --csr-out "$name.csr"
  "$KEYMIG" hsm ca sign --ca ca --csr "$name.csr" --out "$name.crt"
  "$KEYMIG" hsm init --dir "$name" --signed-cert "$name.crt" --trust-anchor ca/ca.pem
  KEYMIG_NEW_PASSWORD=network-app "$KEYMIG" hsm user create --cluster "$name" --username app --role crypto-user
done

step "3. a clone of west in eu-west-2, from west's backup"
KEYMIG_PIN= "$KEYMIG" hsm backup create --cluster west --out west.backup
KEYMIG_PIN= "$KEYMIG" hsm restore --backup west.backup --dir west-dr --region eu-west-2 --hsms 2

step "4. 4 daemons, one per HSM"
unset KEYMIG_PIN
for name in east west; do
  # Serve once to pick the ports, then one daemon per HSM on them.
  "$KEYMIG" hsm serve --dir "$name" --ready-file "$name.ports" > /dev/null 2>&1 &
  p=$!
  wait_ready "$name.ports" 2
  kill -TERM "$p"
  wait "$p"
  for id in $(awk '{print $3}' "$name.ports"); do
    "$KEYMIG" hsm serve --dir "$name" --hsm "$id" --ready-file "$name-$id.ready" --log-format json 2> "$name-$id.log" &
    pids+=("$!")
    wait_ready "$name-$id.ready" 1
    cat "$name-$id.ready"
  done
done

step "5. client directories: addresses, trust anchor; no HSM file, no PIN"
"$KEYMIG" hsm client-config --cluster east --out app-east
"$KEYMIG" hsm client-config --cluster west --out app-west
ls app-east
KEYMIG_PIN= "$KEYMIG" hsm status --cluster app-east

step "6. keys on east, then a migration east -> west over the network"
export KEYMIG_PIN=app:network-app KEYMIG_SOURCE_PIN=app:network-app KEYMIG_TARGET_PIN=app:network-app
"$KEYMIG" hsm key generate --cluster app-east --type aes-256 --label data --id 0100 --count 20 > /dev/null
"$KEYMIG" hsm key generate --cluster app-east --type rsa-2048 --label signing --id 0200 > /dev/null
status=0
"$KEYMIG" plan --source app-east --target app-west --out plan.json || status=$?
[ "$status" -eq 2 ] || { echo "plan: exit $status, want 2 (changes pending)" >&2; exit 1; }
"$KEYMIG" migrate --plan plan.json --workers 16 --no-progress
"$KEYMIG" verify --plan plan.json
"$KEYMIG" hsm key list --cluster app-west > west-keys.txt
head -4 west-keys.txt

step "7. synckey: west -> its clone west-dr"
"$KEYMIG" synckey --source app-west --target west-dr --no-progress
echo "a second sync finds nothing to copy:"
"$KEYMIG" synckey --source app-west --target west-dr --dry-run --no-progress > sync-again.txt
tail -3 sync-again.txt

step "8. SIGTERM: each daemon drains and exits 0"
for p in "${pids[@]}"; do kill -TERM "$p"; done
for p in "${pids[@]}"; do wait "$p"; done
pids=()
grep -c '"msg":"stopping' ./*.log
echo "done: 4 daemons served two networked clusters; the migration and the sync ran from client directories"
