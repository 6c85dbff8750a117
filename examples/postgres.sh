#!/usr/bin/env bash
# keymig and a PostgreSQL data-key table: an application keeps one wrapped
# data key per row; keymig rotates the table in place under a new master
# key, inside the HSMs, and verifies every row.
#
#   1. an embedded 2-HSM cluster with an old and a new master key;
#   2. a table of N data keys (default 100,000) under the old master;
#   3. a dry run: the rows by master and alg;
#   4. the rotation, in place, resumable (run it again after a kill);
#   5. datakeys verify: every row unwraps under the new master, and the
#      data keys are the ones the table held before (same fingerprint).
#
# Usage: PGURL=postgres://USER@HOST:PORT/DB?sslmode=... PGPASSWORD=... \
#        KEYMIG=/path/to/keymig examples/postgres.sh [N]
# The database must be one you can create a table in; the password comes
# from PGPASSWORD, PGPASSFILE or ~/.pgpass, never from the URL.
set -euo pipefail
umask 077

KEYMIG=${KEYMIG:-keymig}
: "${PGURL:?set PGURL to a postgres:// URL of a scratch database}"
N=${1:-100000}
work=$(mktemp -d "${TMPDIR:-/tmp}/keymig-postgres.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
step() { printf '\n== %s\n' "$*"; }
rows() { psql "$PGURL" -X -q -c "SELECT id, master_label, master_kcv, alg, encode(substring(wrapped_key from 1 for 12), 'hex') || '...' AS wrapped_key FROM app.data_keys ORDER BY id LIMIT 3"; }

step "1. a 2-HSM cluster with masters tde-2025 and tde-2026"
export KEYMIG_KDF_ITERATIONS=${KEYMIG_KDF_ITERATIONS:-1000}
KEYMIG_PIN=admin:example-admin-pass "$KEYMIG" hsm init --dir hsm --hsms 2 >/dev/null
KEYMIG_PIN=admin:example-admin-pass KEYMIG_NEW_PASSWORD=example-alice-pass \
  "$KEYMIG" hsm user create --cluster hsm --username alice --role crypto-user >/dev/null
export KEYMIG_PIN=alice:example-alice-pass
for label in tde-2025 tde-2026; do
  "$KEYMIG" hsm key generate --cluster hsm --type aes-256 --label "$label" \
    --attr extractable=false --attr wrap=true --attr unwrap=true >/dev/null
done
masters=(--source hsm --from-key attr.label=tde-2025 --to-key attr.label=tde-2026)

step "2. $N data keys made inside the HSM, wrapped under tde-2025, in app.data_keys"
psql "$PGURL" -X -q -c 'CREATE SCHEMA IF NOT EXISTS app'
"$KEYMIG" datakeys generate --cluster hsm --master attr.label=tde-2025 --count "$N" \
  --out "$PGURL" --table app.data_keys --no-progress
rows

step "3. dry run (exit 2: there is work to do)"
set +e
"$KEYMIG" rotate "${masters[@]}" --in "$PGURL" --table app.data_keys --dry-run
code=$?
set -e
[[ $code == 2 ]] || { echo "dry run: exit $code, want 2" >&2; exit 1; }

step "4. rotate in place"
"$KEYMIG" datakeys verify "${masters[@]}" --in "$PGURL" --table app.data_keys --output json > before.json || true
"$KEYMIG" rotate "${masters[@]}" --in "$PGURL" --table app.data_keys --journal rotate.journal --no-progress
rows

step "5. verify every row inside the HSMs"
"$KEYMIG" datakeys verify "${masters[@]}" --in "$PGURL" --table app.data_keys --output json > after.json
fp() { sed -n 's/.*"fingerprint": *"\([0-9a-f]*\)".*/\1/p' "$1"; }
echo "fingerprint before: $(fp before.json)"
echo "fingerprint after:  $(fp after.json)"
[[ -n "$(fp before.json)" && "$(fp before.json)" == "$(fp after.json)" ]] || { echo "the data keys changed" >&2; exit 1; }
echo "every row is under tde-2026 and holds the data key it held before"
psql "$PGURL" -X -q -c 'DROP TABLE app.data_keys'
