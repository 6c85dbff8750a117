package hsm

import (
	"errors"
	"fmt"
	"strings"
)

// Code is the stable, wire-safe classification of an HSM error.
type Code string

// The error codes. They are part of the contract: never rename one.
const (
	CodeNotFound             Code = "not-found"
	CodeExists               Code = "exists"
	CodePermission           Code = "permission"
	CodeNotExtractable       Code = "not-extractable"
	CodeUnsupportedMechanism Code = "unsupported-mechanism"
	CodeThrottled            Code = "throttled"
	CodeUnavailable          Code = "unavailable"
	CodeQuorum               Code = "quorum"
	CodeInvalidInput         Code = "invalid-input"
	CodeIntegrity            Code = "integrity"
	// CodeCapacity is not in CloudHSM's list of causes but is a distinct,
	// non-retryable condition callers must act on (delete keys or raise the
	// cluster's limit), so it gets its own code rather than invalid-input.
	CodeCapacity Code = "capacity"
	// CodeUnsupported says the backend lacks a capability altogether (a
	// PKCS#11 token has no owners, shares or masked objects), as opposed
	// to a mechanism it does not offer.
	CodeUnsupported Code = "unsupported"
)

// Retryable reports whether an operation that failed with this code may
// succeed if simply tried again later: the HSM was busy, unreachable, or the
// key had not yet reached enough HSMs.
func (c Code) Retryable() bool {
	switch c {
	case CodeThrottled, CodeUnavailable, CodeQuorum:
		return true
	}
	return false
}

// Error is an HSM error: a stable code, the operation, the key involved (if
// any) and a message meant for a person. It is a plain value so that it can
// be encoded as JSON and rebuilt on the other side of a network.
type Error struct {
	Code Code   `json:"code"`
	Op   string `json:"op,omitempty"`
	Key  KeyRef `json:"key,omitempty"`
	Msg  string `json:"msg"`
}

// Error formats the error as "op key: msg", leaving out what is empty.
func (e *Error) Error() string {
	key := e.Key != 0 && !strings.Contains(e.Msg, e.Key.String())
	switch {
	case e.Op != "" && key:
		return fmt.Sprintf("%s %s: %s", e.Op, e.Key, e.Msg)
	case e.Op != "":
		return e.Op + ": " + e.Msg
	case key:
		return fmt.Sprintf("key %s: %s", e.Key, e.Msg)
	}
	return e.Msg
}

// Is makes errors.Is(err, ErrX) match any *Error with X's code, whatever its
// op, key or message.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code && (t.Msg == "" || t.Msg == e.Msg)
}

// Retryable reports whether trying the same operation again may succeed.
func (e *Error) Retryable() bool { return e.Code.Retryable() }

// Errorf returns an *Error with code c for operation op on key (0 for none).
func Errorf(c Code, op string, key KeyRef, format string, args ...any) *Error {
	return &Error{Code: c, Op: op, Key: key, Msg: fmt.Sprintf(format, args...)}
}

// Sentinels for errors.Is; they match any error with the same code.
var (
	ErrNotFound             = &Error{Code: CodeNotFound}
	ErrExists               = &Error{Code: CodeExists}
	ErrPermission           = &Error{Code: CodePermission}
	ErrNotExtractable       = &Error{Code: CodeNotExtractable}
	ErrUnsupportedMechanism = &Error{Code: CodeUnsupportedMechanism}
	ErrThrottled            = &Error{Code: CodeThrottled}
	ErrUnavailable          = &Error{Code: CodeUnavailable}
	ErrQuorum               = &Error{Code: CodeQuorum}
	ErrInvalidInput         = &Error{Code: CodeInvalidInput}
	ErrIntegrity            = &Error{Code: CodeIntegrity}
	ErrCapacity             = &Error{Code: CodeCapacity}
	ErrUnsupported          = &Error{Code: CodeUnsupported}
)

// UnwrapFailedMessage is the one message of every unwrap failure, whatever
// went wrong: bad padding, wrong key, wrong hash, altered or truncated blob.
const UnwrapFailedMessage = "unwrap failed: the wrapped key, the unwrapping key or the mechanism parameters are wrong"

// ErrUnwrapFailed is the one error every unwrap failure returns (code
// integrity). Backends return it as is, never with the underlying cause.
var ErrUnwrapFailed = &Error{Code: CodeIntegrity, Op: "unwrap", Msg: UnwrapFailedMessage}

// CodeOf returns the code of the first *Error in err's chain, or "" if there
// is none.
func CodeOf(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

// IsRetryable reports whether err is an HSM error that a retry may cure.
func IsRetryable(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Retryable()
}

// QuorumError returns the error CloudHSM gives for a token key that is not
// yet on enough HSMs to be used.
func QuorumError(op string, key KeyRef) *Error {
	return &Error{Code: CodeQuorum, Op: op, Key: key,
		Msg: fmt.Sprintf("Key %s does not meet the availability requirements - The key must be available on at least 2 HSMs before being used.", key)}
}

// QuorumCreateError is the refusal to create a token key that could not be
// made available on 2 HSMs (CloudHSM: "any attempt to create or use a
// token key will fail"); unreachable names the HSMs that are down. Nothing
// is left behind, so the create may simply be tried again later.
func QuorumCreateError(op string, key KeyRef, unreachable []string) *Error {
	msg := "Key creation refused: the key would not meet the availability requirements - The key must be available on at least 2 HSMs before being used."
	if len(unreachable) > 0 {
		msg += fmt.Sprintf(" HSM %s is unreachable, so no second HSM can hold it; nothing was created", strings.Join(unreachable, ", "))
	} else {
		msg += " It reached one HSM only; nothing was created"
	}
	return &Error{Code: CodeQuorum, Op: op, Key: key, Msg: msg}
}
