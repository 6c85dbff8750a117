package node

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strconv"
	"time"

	"github.com/keymig/keymig/hsm"
	bolt "go.etcd.io/bbolt"
)

// The audit record: its JSON, its place in the hash chain, and the head
// kept in the HSM file so that records cut from the end are noticed.
// AuditPath is the audit log file of the HSM whose bbolt file is hsmPath.
func AuditPath(hsmPath string) string { return hsmPath + ".audit" }

// appendRecordJSON appends what json.Marshal(rec) gives with rec.Prev set
// to hex(prev), without reflection: append runs it under the log's lock
// for every record.
func appendRecordJSON(b []byte, rec *hsm.AuditRecord, prev []byte) []byte {
	b = append(b, `{"seq":`...)
	b = strconv.AppendUint(b, rec.Seq, 10)
	b = append(b, `,"time":"`...)
	b = rec.Time.AppendFormat(b, time.RFC3339Nano) // as Time.MarshalJSON
	b = append(b, `","user":`...)
	b = appendJSONString(b, rec.User)
	b = append(b, `,"op":`...)
	b = appendJSONString(b, rec.Op)
	if len(rec.Handles) > 0 {
		b = append(b, `,"handles":[`...)
		for i, h := range rec.Handles {
			if i > 0 {
				b = append(b, ',')
			}
			// KeyRef.MarshalText: "0x%016x".
			b = append(b, `"0x`...)
			var hb [8]byte
			binary.BigEndian.PutUint64(hb[:], uint64(h))
			b = hex.AppendEncode(b, hb[:])
			b = append(b, '"')
		}
		b = append(b, ']')
	}
	if rec.Target != "" {
		b = append(b, `,"target":`...)
		b = appendJSONString(b, rec.Target)
	}
	b = append(b, `,"outcome":`...)
	b = appendJSONString(b, rec.Outcome)
	b = append(b, `,"prev":"`...)
	b = hex.AppendEncode(b, prev)
	return append(b, `"}`...)
}

// appendJSONString appends s as encoding/json writes it: directly when it
// needs no escaping (printable ASCII without ", \, <, > or &), else through
// json.Marshal.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			j, _ := json.Marshal(s)
			return append(b, j...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// auditHead is kept in meta so that removing records from the end of the
// audit file is detected: the file held at least up to Seq, and record Seq
// had Hash. Records beyond it are fine (the head is written lazily).
type auditHead struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
}

const (
	auditMaxBuffered  = 4 << 20               // appenders wait while this much is not yet handed to the disk
	auditHeadInterval = 50 * time.Millisecond // the head in meta lags the file by at most this much while the log is busy
	auditTailWindow   = 64 << 10              // Open reads the file's tail in windows of this size
)

var (
	errAuditClosed      = errors.New("the audit log is closed")
	errAuditHeadCorrupt = errors.New("the audit log head is corrupt")
)

// chainHash is a record's hash: SHA-256 of the previous record's hash
// (raw 32 bytes; none for record 1) ‖ the record's JSON.
func chainHash(prev, body []byte) [32]byte {
	h := sha256.New()
	h.Write(prev)
	h.Write(body)
	var s [32]byte
	h.Sum(s[:0])
	return s
}

// readHead reads the audit head from meta; a missing head is the zero head.
func readHead(tx *bolt.Tx) (auditHead, error) {
	var head auditHead
	if v := tx.Bucket(bktMeta).Get(metaAuditHead); v != nil {
		if err := json.Unmarshal(v, &head); err != nil {
			return head, errAuditHeadCorrupt
		}
	}
	return head, nil
}
