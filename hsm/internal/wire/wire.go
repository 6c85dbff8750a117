// Package wire is the protocol between hsm/server and hsm/remote: HTTP/2
// over TLS 1.3, one POST per operation to /v1/OP with a JSON Call, answered
// by a JSON Result, or by an error body whose hsm.Error keeps its code (and
// so whether a retry may help). Listings are streamed as JSON lines ending
// with a trailer that counts them, so a cut-short listing is detected.
//
// A client may instead send its calls on one long-lived OpStream request
// (a server that takes it says so with HeaderStream on every answer): its
// body is a sequence of StreamCall, each with its own id, operation,
// session and deadline; the server runs them at once and writes each one's
// StreamAnswer when it is done, in any order. Calls made at once then share
// HTTP/2 frames, TLS records and syscalls, and none waits for another's
// answer. The server ends the answer with End once it reads no more calls;
// a call it has not answered by then it never ran.
package wire

import (
	"encoding/json"
	"time"

	"github.com/keymig/keymig/hsm"
)

// Path is the prefix of every operation's URL path.
const Path = "/v1/"

// Headers of a call.
const (
	// HeaderSession carries the session token a login returned.
	HeaderSession = "Keymig-Session"
	// HeaderDeadline carries the caller's deadline (RFC 3339, nanoseconds);
	// the server runs the operation under it.
	HeaderDeadline = "Keymig-Deadline"
	// HeaderStream is set on every answer of a server that takes OpStream.
	HeaderStream = "Keymig-Stream"
)

// Operations that need no session: the peer API and the HSM's management.
const (
	OpLogin              = "login"
	OpBootstrap          = "bootstrap"
	OpSetFault           = "set-fault"
	OpGetFault           = "get-fault"
	OpVerifyAudit        = "verify-audit"
	OpAudit              = "audit" // streamed
	OpPeerListKeys       = "peer-list-keys"
	OpPeerExportMasked   = "peer-export-masked"
	OpPeerInsertMasked   = "peer-insert-masked"
	OpPeerDeleteKey      = "peer-delete-key"
	OpPeerUsers          = "peer-users"
	OpPeerPutUser        = "peer-put-user"
	OpPeerPutQuorumToken = "peer-put-quorum-token"
	OpSnapshot           = "snapshot"
	OpRestoreSnapshot    = "restore-snapshot"
	OpPing               = "ping"
	// OpStream carries a sequence of StreamCall, answered by a sequence
	// of StreamAnswer. Streamed listings and streams cannot travel in it.
	OpStream = "stream"
)

// Operations of a logged-in session (HeaderSession set).
const (
	OpGenerateKey         = "generate-key"
	OpGenerateKeyPair     = "generate-key-pair"
	OpListKeys            = "list-keys" // streamed
	OpGetKey              = "get-key"
	OpWrapKey             = "wrap-key"
	OpUnwrapKey           = "unwrap-key"
	OpEncrypt             = "encrypt"
	OpDecrypt             = "decrypt"
	OpInfo                = "info"
	OpLogout              = "logout"
	OpShareKey            = "share-key"
	OpUnshareKey          = "unshare-key"
	OpSetAttribute        = "set-attribute"
	OpDeleteKey           = "delete-key"
	OpExportPublicKey     = "export-public-key"
	OpImportPublicKey     = "import-public-key"
	OpExportMasked        = "export-masked"
	OpInsertMasked        = "insert-masked"
	OpCreateUser          = "create-user"
	OpDeleteUser          = "delete-user"
	OpChangePassword      = "change-password"
	OpListUsers           = "list-users"
	OpRegisterQuorumKey   = "register-quorum-key"
	OpSetQuorumPolicy     = "set-quorum-policy"
	OpGenerateQuorumToken = "generate-quorum-token"
	OpApproveQuorumToken  = "approve-quorum-token"
)

// Call is the body of every operation; each uses the fields it needs. A
// password travels only here, inside TLS, and is never logged.
type Call struct {
	User      string               `json:"user,omitempty"`
	Password  string               `json:"password,omitempty"`
	Role      hsm.Role             `json:"role,omitempty"`
	Ref       uint64               `json:"ref,omitempty"`
	Attr      hsm.Attr             `json:"attr,omitempty"`
	Value     bool                 `json:"value,omitempty"`
	Data      []byte               `json:"data,omitempty"`
	Mechanism hsm.Mechanism        `json:"mechanism,omitempty"`
	Params    *hsm.Params          `json:"params,omitempty"`
	KeySpec   *hsm.KeySpec         `json:"key-spec,omitempty"`
	PairSpec  *hsm.KeyPairSpec     `json:"pair-spec,omitempty"`
	Filter    *Filter              `json:"filter,omitempty"`
	Wrap      *WrapRequest         `json:"wrap,omitempty"`
	Unwrap    *UnwrapRequest       `json:"unwrap,omitempty"`
	Template  *hsm.Template        `json:"template,omitempty"`
	Fault     *hsm.Fault           `json:"fault,omitempty"`
	Record    *hsm.UserRecord      `json:"record,omitempty"`
	Token     *hsm.QuorumToken     `json:"token,omitempty"`
	Service   hsm.QuorumService    `json:"service,omitempty"`
	M         int                  `json:"m,omitempty"`
	TokenID   hsm.Bytes            `json:"token-id,omitempty"`
	Approvals []hsm.QuorumApproval `json:"approvals,omitempty"`
	// Masked asks a call that makes token keys to answer with their masked
	// objects too (Result.Masked), exported in the same call.
	Masked bool `json:"masked,omitempty"`
}

// StreamCall is one call of an OpStream: what its own request would carry
// in its path, headers and body (a Call, encoded by its caller), and an id
// its answer names.
type StreamCall struct {
	ID       uint64          `json:"id"`
	Op       string          `json:"op"`
	Session  string          `json:"session,omitempty"`
	Deadline time.Time       `json:"deadline,omitzero"`
	Call     json.RawMessage `json:"call"`
}

// StreamAnswer is the answer of the call ID of an OpStream: its Result or
// its Error. The last one has End set, and nothing else.
type StreamAnswer struct {
	ID     uint64  `json:"id,omitempty"`
	Result *Result `json:"result,omitempty"`
	Error  *Error  `json:"error,omitempty"`
	End    bool    `json:"end,omitempty"`
}

// Result is the answer of every operation that is not streamed.
type Result struct {
	Session string            `json:"session,omitempty"`
	User    *hsm.User         `json:"user,omitempty"`
	Key     *hsm.KeyInfo      `json:"key,omitempty"`
	Pub     *hsm.KeyInfo      `json:"pub,omitempty"`
	Data    []byte            `json:"data,omitempty"`
	Info    *hsm.ClusterInfo  `json:"info,omitempty"`
	Users   []hsm.User        `json:"users,omitempty"`
	Records []hsm.UserRecord  `json:"records,omitempty"`
	Token   *hsm.QuorumToken  `json:"token,omitempty"`
	Count   int               `json:"count,omitempty"`
	Fault   *hsm.Fault        `json:"fault,omitempty"`
	Extra   map[string]string `json:"extra,omitempty"`
	// Masked holds the masked objects of the token keys made, when the call
	// asked for them and the export did not fail.
	Masked []MaskedKey `json:"masked,omitempty"`
}

// MaskedKey is the masked object of the key Ref.
type MaskedKey struct {
	Ref  uint64 `json:"ref"`
	Blob []byte `json:"blob"`
}

// Error is the body of a failed operation. Code is empty for an error
// that is not an *hsm.Error (a broken file, say); its message is kept.
type Error struct {
	Code hsm.Code `json:"code,omitempty"`
	Op   string   `json:"op,omitempty"`
	Key  uint64   `json:"key,omitempty"`
	Msg  string   `json:"msg"`
	// Deadline says the caller's deadline passed before the HSM answered:
	// the client returns context.DeadlineExceeded, whichever of its own
	// timer and this answer comes first.
	Deadline bool `json:"deadline,omitempty"`
	// Unknown says the HSM failed while it did the call, which may have
	// taken effect: the client reports an outcome it does not know.
	Unknown bool `json:"unknown,omitempty"`
}

// Item is one line of a streamed listing: a key, an audit record, or the
// trailer (End, with the number of items sent, or the error that cut the
// listing short).
type Item struct {
	Key   *hsm.KeyInfo     `json:"key,omitempty"`
	Audit *hsm.AuditRecord `json:"audit,omitempty"`
	Hash  string           `json:"hash,omitempty"` // an audit record's own hash
	End   bool             `json:"end,omitempty"`
	Count int              `json:"count,omitempty"`
	Error *Error           `json:"error,omitempty"`
}

// Filter is hsm.Filter on the wire. hsm.KeyRef refuses a zero handle when
// decoded, so the handles of requests travel as plain numbers, 0 for none.
type Filter struct {
	Ref   uint64            `json:"ref,omitempty"`
	Label *string           `json:"label,omitempty"`
	ID    hsm.Bytes         `json:"id,omitempty"`
	Class hsm.Class         `json:"class,omitempty"`
	Type  hsm.KeyType       `json:"type,omitempty"`
	Attrs map[hsm.Attr]bool `json:"attrs,omitempty"`
}

// FilterOf is f on the wire.
func FilterOf(f hsm.Filter) *Filter {
	return &Filter{Ref: uint64(f.Ref), Label: f.Label, ID: f.ID, Class: f.Class, Type: f.Type, Attrs: f.Attrs}
}

// HSM is the filter it carries.
func (f *Filter) HSM() hsm.Filter {
	if f == nil {
		return hsm.Filter{}
	}
	return hsm.Filter{Ref: hsm.KeyRef(f.Ref), Label: f.Label, ID: f.ID, Class: f.Class, Type: f.Type, Attrs: f.Attrs}
}

// WrapRequest is hsm.WrapRequest on the wire.
type WrapRequest struct {
	Mechanism   hsm.Mechanism `json:"mechanism"`
	Params      hsm.Params    `json:"params"`
	WrappingKey uint64        `json:"wrapping-key"`
	Payload     uint64        `json:"payload"`
}

// WrapOf is r on the wire.
func WrapOf(r hsm.WrapRequest) *WrapRequest {
	return &WrapRequest{Mechanism: r.Mechanism, Params: r.Params, WrappingKey: uint64(r.WrappingKey), Payload: uint64(r.Payload)}
}

// HSM is the request it carries.
func (r *WrapRequest) HSM() hsm.WrapRequest {
	return hsm.WrapRequest{Mechanism: r.Mechanism, Params: r.Params, WrappingKey: hsm.KeyRef(r.WrappingKey), Payload: hsm.KeyRef(r.Payload)}
}

// UnwrapRequest is hsm.UnwrapRequest on the wire.
type UnwrapRequest struct {
	Mechanism     hsm.Mechanism `json:"mechanism"`
	Params        hsm.Params    `json:"params"`
	UnwrappingKey uint64        `json:"unwrapping-key"`
	Blob          []byte        `json:"blob"`
	Class         hsm.Class     `json:"class"`
	Type          hsm.KeyType   `json:"type"`
	Template      hsm.Template  `json:"template"`
}

// UnwrapOf is r on the wire.
func UnwrapOf(r hsm.UnwrapRequest) *UnwrapRequest {
	return &UnwrapRequest{Mechanism: r.Mechanism, Params: r.Params, UnwrappingKey: uint64(r.UnwrappingKey), Blob: r.Blob, Class: r.Class, Type: r.Type, Template: r.Template}
}

// HSM is the request it carries.
func (r *UnwrapRequest) HSM() hsm.UnwrapRequest {
	return hsm.UnwrapRequest{Mechanism: r.Mechanism, Params: r.Params, UnwrappingKey: hsm.KeyRef(r.UnwrappingKey), Blob: r.Blob, Class: r.Class, Type: r.Type, Template: r.Template}
}
