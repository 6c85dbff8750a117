#!/usr/bin/env bash
# keymig quickstart: an offline round trip with the rsa-aes mechanism
# (PKCS#11 CKM_RSA_AES_KEY_WRAP, as AWS KMS and Google Cloud KMS import it),
# then a migration between two embedded HSM clusters (steps 6-11) in which a
# non-extractable master key's data keys are re-encrypted under a new master
# (plaintext never on the host), and a cross-region sync to a clone (step 12).
#
#   1. make an RSA-3072 key pair and an AES-256 key with openssl;
#   2. wrap the AES key with keymig;
#   3. unwrap it with openssl alone, the way the cloud import guides do;
#   4. unwrap it with keymig.
#
# Usage: KEYMIG=/path/to/keymig examples/quickstart.sh   (default: keymig on PATH)
set -euo pipefail
umask 077

KEYMIG=${KEYMIG:-keymig}
work=$(mktemp -d "${TMPDIR:-/tmp}/keymig-quickstart.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

step() { printf '\n== %s\n' "$*"; }

step "1. an RSA-3072 key pair (the importer's) and an AES-256 key (the one to move), in $work"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out private.pem 2>/dev/null
openssl pkey -in private.pem -pubout -out public.pem
openssl rand -out aes256.bin 32
ls -l private.pem public.pem aes256.bin

step "2. keymig wrap --mechanism rsa-aes (OAEP SHA-256, AES-256 ephemeral key)"
"$KEYMIG" wrap --mechanism rsa-aes --wrapping-key public.pem --in aes256.bin --out blob.bin
ls -l blob.bin

step "3. unwrap with openssl only: split the blob after the 384-byte RSA part"
modulus_bytes=384
head -c "$modulus_bytes" blob.bin > blob.rsa
tail -c "+$((modulus_bytes + 1))" blob.bin > blob.kwp
openssl pkeyutl -decrypt -inkey private.pem -in blob.rsa -out ephemeral.bin \
  -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256
echo "openssl recovered the $(wc -c < ephemeral.bin)-byte ephemeral AES key (RSA-OAEP SHA-256)"
openssl enc -d -id-aes256-wrap-pad -iv A65959A6 -K "$(od -An -tx1 ephemeral.bin | tr -d ' \n')" \
  -in blob.kwp -out openssl-unwrapped.bin
cmp aes256.bin openssl-unwrapped.bin
echo "openssl unwrapped the key (AES-KWP, RFC 5649): identical to aes256.bin"

step "4. keymig unwrap"
"$KEYMIG" unwrap --mechanism rsa-aes --unwrapping-key private.pem --in blob.bin --out keymig-unwrapped.bin
cmp aes256.bin keymig-unwrapped.bin
echo "keymig unwrapped the key: identical to aes256.bin"

step "5. a wrong key fails with one message, whatever the cause"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out other.pem 2>/dev/null
if "$KEYMIG" unwrap --mechanism rsa-aes --unwrapping-key other.pem --in blob.bin --out never.bin 2>&1; then
  echo "unexpected: unwrapping with the wrong key succeeded" >&2
  exit 1
fi

echo "(the failure above is expected)"

# --- Part two: a migration between two embedded HSM clusters -------------
# PINs come from the environment, never from a flag's value.
step "6. two embedded clusters of 2 HSMs each: the old one and the new one"
export KEYMIG_PIN=admin:quickstart-admin
"$KEYMIG" hsm init --dir old --hsms 2 --region us-east-1
"$KEYMIG" hsm init --dir new --hsms 2 --region eu-west-1
for c in old new; do
  KEYMIG_NEW_PASSWORD=quickstart-app "$KEYMIG" hsm user create --cluster "$c" --username app --role crypto-user
done

step "7. keys on the old cluster: 25 AES-256 keys, an RSA and an EC key pair, and a non-extractable TDE master key with 2000 data keys wrapped under it"
export KEYMIG_PIN=app:quickstart-app
"$KEYMIG" hsm key generate --cluster old --type aes-256 --label data --id 0100 --count 25 >/dev/null
"$KEYMIG" hsm key generate --cluster old --type rsa-2048 --label signing --id 0200 >/dev/null
"$KEYMIG" hsm key generate --cluster old --type ec-p256 --label tls --id 0300 >/dev/null
"$KEYMIG" hsm key generate --cluster old --type aes-256 --label tde-master --id 0400 \
  --attr extractable=false --attr wrap=true --attr unwrap=true >/dev/null
"$KEYMIG" hsm key list --cluster old > old-keys.txt
head -5 old-keys.txt
echo "..."
# The HSM makes each data key and wraps it under the master (AES-KWP).
"$KEYMIG" datakeys generate --cluster old --master attr.label=tde-master --count 2000 --out tde-keys.jsonl --no-progress
echo "tde-keys.jsonl: $(wc -l < tde-keys.jsonl) data keys, e.g."
head -1 tde-keys.jsonl

step "8. keymig plan: what would move, how, and what cannot (exit status 2: there is work)"
echo "tde-master cannot leave its HSM; --datakeys makes it a rotation instead of a blocked key"
export KEYMIG_SOURCE_PIN=app:quickstart-app KEYMIG_TARGET_PIN=app:quickstart-app
set +e
"$KEYMIG" plan --source old --target new --datakeys tde-master=tde-keys.jsonl --out plan.json
status=$?
set -e
[ "$status" -eq 2 ] || { echo "plan exited $status, expected 2" >&2; exit 1; }

step "9. keymig migrate: a resumable job recorded in plan.json.journal; a new tde-master on the new cluster, data keys re-encrypted under it"
"$KEYMIG" migrate --plan plan.json --workers 32
echo "the same record, rotated: only master and ciphertext changed"
head -1 tde-keys.jsonl.rotated

step "10. keymig verify: every planned key on the new cluster, same check value, on 2 HSMs; every data key the same inside the HSMs"
"$KEYMIG" verify --plan plan.json
"$KEYMIG" datakeys verify --source old --from-key attr.label=tde-master --in tde-keys.jsonl \
  --target new --to-key attr.label=tde-master --rotated tde-keys.jsonl.rotated
"$KEYMIG" journal status --journal plan.json.journal

step "11. running migrate again is a no-op"
"$KEYMIG" migrate --plan plan.json

step "12. cross-region sync: back up the new cluster, restore a clone in ap-southeast-2, add a key on the source, keymig synckey"
KEYMIG_PIN= "$KEYMIG" hsm backup create --cluster new --out new.backup
KEYMIG_PIN= "$KEYMIG" hsm restore --backup new.backup --dir new-ap --region ap-southeast-2 --hsms 2
KEYMIG_PIN=app:quickstart-app "$KEYMIG" hsm key generate --cluster new --type aes-256 --label added-after-clone --id 0500 --attr extractable=false
KEYMIG_SOURCE_PIN=app:quickstart-app KEYMIG_TARGET_PIN=app:quickstart-app "$KEYMIG" synckey --source new --target new-ap
printf '\nquickstart: OK\n'
