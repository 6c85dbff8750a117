#!/usr/bin/env bash
# keymig and a real HSM through PKCS#11: a SoftHSM2 token stands in for a
# legacy HSM; keymig moves its keys into an included cluster and back out
# to a second token.
#
#   1. a throwaway SoftHSM2 configuration with two tokens, legacy and new-hsm;
#   2. N AES-256 keys (default 200) and an RSA-2048 key pair on legacy,
#      made with pkcs11-tool as a user of that HSM would;
#   3. plan → migrate → verify from the token into a 2-HSM included cluster
#      (plan negotiates the transport: SoftHSM 2.6 has no CKM_RSA_AES_KEY_WRAP
#      and takes RSA-OAEP with SHA-1 only, so session-kek with OAEP-SHA1 and
#      AES-KWP per key);
#   4. plan → migrate → verify from the cluster out to the new-hsm token.
#
# Usage: KEYMIG=/path/to/keymig examples/pkcs11.sh [N]
# Needs softhsm2 and opensc (apt-get install softhsm2 opensc). The token
# PINs come from the environment, never from the URI.
set -euo pipefail
umask 077

KEYMIG=${KEYMIG:-keymig}
N=${1:-200}
MODULE=${PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
for tool in softhsm2-util pkcs11-tool; do
  command -v "$tool" >/dev/null || { echo "pkcs11.sh: $tool not found (apt-get install softhsm2 opensc)" >&2; exit 2; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/keymig-pkcs11.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
step() { printf '\n== %s\n' "$*"; }

step "1. SoftHSM2 tokens legacy and new-hsm under $work/tokens"
mkdir tokens
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' "$work" > softhsm2.conf
export SOFTHSM2_CONF=$work/softhsm2.conf
LEGACY_PIN=example-legacy-pin NEW_PIN=example-new-pin
softhsm2-util --init-token --free --label legacy --so-pin example-so-pin --pin "$LEGACY_PIN" >/dev/null
softhsm2-util --init-token --free --label new-hsm --so-pin example-so-pin --pin "$NEW_PIN" >/dev/null
legacy="pkcs11:token=legacy?module-path=$MODULE"
newhsm="pkcs11:token=new-hsm?module-path=$MODULE"

step "2. $N AES-256 keys and an RSA-2048 key pair on legacy, made with pkcs11-tool"
p11() { pkcs11-tool --module "$MODULE" --token-label legacy --login --pin "$LEGACY_PIN" "$@" >/dev/null 2>&1; }
for ((i = 1; i <= N; i++)); do
  p11 --keygen --key-type AES:32 --label "$(printf 'mk-%05d' "$i")" --id "$(printf '6d6b%06x' "$i")" \
    --sensitive --extractable --usage-decrypt
done
p11 --keypairgen --key-type rsa:2048 --label signer --id 5349 --extractable --usage-sign
KEYMIG_PIN=$LEGACY_PIN "$KEYMIG" hsm key list --cluster "$legacy" --filter attr.label=signer

step "3. the token → a 2-HSM included cluster"
export KEYMIG_KDF_ITERATIONS=${KEYMIG_KDF_ITERATIONS:-1000}
KEYMIG_PIN=admin:example-admin-pass "$KEYMIG" hsm init --dir cluster --hsms 2 >/dev/null
KEYMIG_PIN=admin:example-admin-pass KEYMIG_NEW_PASSWORD=example-alice-pass \
  "$KEYMIG" hsm user create --cluster cluster --username alice --role crypto-user >/dev/null
export KEYMIG_SOURCE_PIN=$LEGACY_PIN KEYMIG_TARGET_PIN=alice:example-alice-pass
rc=0; "$KEYMIG" plan --source "$legacy" --target cluster --out in.json || rc=$?
(( rc == 2 )) || { echo "pkcs11.sh: plan exited $rc, want 2 (work to do)" >&2; exit 1; }
"$KEYMIG" migrate --plan in.json --no-progress
"$KEYMIG" verify --plan in.json

step "4. the cluster → the new-hsm token"
export KEYMIG_SOURCE_PIN=alice:example-alice-pass KEYMIG_TARGET_PIN=$NEW_PIN
rc=0; "$KEYMIG" plan --source cluster --target "$newhsm" --out out.json || rc=$?
(( rc == 2 )) || { echo "pkcs11.sh: plan exited $rc, want 2 (work to do)" >&2; exit 1; }
"$KEYMIG" migrate --plan out.json --no-progress
"$KEYMIG" verify --plan out.json
KEYMIG_PIN=$NEW_PIN "$KEYMIG" hsm key list --cluster "$newhsm" --filter attr.label=signer
echo
echo "pkcs11.sh: $((N + 2)) keys moved legacy → cluster → new-hsm, every one verified by check value"
