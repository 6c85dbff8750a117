package pkcs11

import (
	"errors"
	"fmt"
	"strings"

	"github.com/keymig/keymig/hsm"
	"github.com/miekg/pkcs11"
)

// ckr returns the CKR_ code of err, or 0 if err is not a module's answer.
func ckr(err error) uint {
	var e pkcs11.Error
	if errors.As(err, &e) {
		return uint(e)
	}
	return 0
}

// ckrName is the CKR_ name of err ("CKR_PIN_INCORRECT"), or its text.
func ckrName(err error) string {
	var e pkcs11.Error
	if errors.As(err, &e) {
		// miekg's text is "pkcs11: 0xA0: CKR_PIN_INCORRECT".
		s := e.Error()
		if i := strings.LastIndex(s, "CKR_"); i >= 0 {
			return s[i:]
		}
		return s
	}
	return err.Error()
}

// codeOf classifies a module's answer into the contract's codes.
func codeOf(err error) hsm.Code {
	switch ckr(err) {
	case pkcs11.CKR_KEY_UNEXTRACTABLE, pkcs11.CKR_KEY_NOT_WRAPPABLE:
		return hsm.CodeNotExtractable
	case pkcs11.CKR_MECHANISM_INVALID, pkcs11.CKR_MECHANISM_PARAM_INVALID, pkcs11.CKR_KEY_TYPE_INCONSISTENT, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED, pkcs11.CKR_WRAPPING_KEY_TYPE_INCONSISTENT:
		return hsm.CodeUnsupportedMechanism
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_PIN_EXPIRED:
		return hsm.CodePermission
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID, pkcs11.CKR_TOKEN_NOT_PRESENT:
		return hsm.CodeNotFound
	case pkcs11.CKR_DEVICE_MEMORY, pkcs11.CKR_HOST_MEMORY:
		return hsm.CodeCapacity
	case pkcs11.CKR_SESSION_COUNT, pkcs11.CKR_FUNCTION_CANCELED:
		return hsm.CodeThrottled
	case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_FUNCTION_FAILED,
		pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED:
		return hsm.CodeUnavailable
	}
	return hsm.CodeInvalidInput
}

// brokenSession reports whether the module's answer means the session
// itself is gone, so the pool must not hand it out again.
func brokenSession(err error) bool {
	switch ckr(err) {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_DEVICE_ERROR:
		return true
	}
	return false
}

// fail restates a module's answer to op as an *hsm.Error that names the
// token and, if any, the key.
func (t *Token) fail(op string, k *object, err error) error {
	var he *hsm.Error
	if errors.As(err, &he) {
		return err
	}
	var ref hsm.KeyRef
	what := ""
	if k != nil {
		ref = k.info.Ref
		what = fmt.Sprintf(" key %s (label %q)", k.info.Ref, k.info.Label)
	}
	return &hsm.Error{Code: codeOf(err), Op: op, Key: ref,
		Msg: fmt.Sprintf("token %s%s: %s", t.name, what, ckrName(err))}
}
