package pkcs11

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/miekg/pkcs11"
)

// api is the part of a PKCS#11 module keymig calls: *pkcs11.Ctx has these
// methods, and unit tests stub them to make a module fail in ways a real
// token rarely does on demand (a wrong PIN counted, a call that crashes).
type api interface {
	Initialize(opts ...pkcs11.InitializeOption) error
	Finalize() error
	Destroy()
	GetSlotList(tokenPresent bool) ([]uint, error)
	GetTokenInfo(slotID uint) (pkcs11.TokenInfo, error)
	GetMechanismList(slotID uint) ([]*pkcs11.Mechanism, error)
	GetMechanismInfo(slotID uint, m []*pkcs11.Mechanism) (pkcs11.MechanismInfo, error)
	OpenSession(slotID uint, flags uint) (pkcs11.SessionHandle, error)
	CloseSession(sh pkcs11.SessionHandle) error
	Login(sh pkcs11.SessionHandle, userType uint, pin string) error
	Logout(sh pkcs11.SessionHandle) error
	CreateObject(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error
	GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error)
	FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error
	FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error)
	FindObjectsFinal(sh pkcs11.SessionHandle) error
	EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Encrypt(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error)
	GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error)
	WrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, wrappingkey, key pkcs11.ObjectHandle) ([]byte, error)
	UnwrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, unwrappingkey pkcs11.ObjectHandle, wrappedkey []byte, a []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	GenerateRandom(sh pkcs11.SessionHandle, length int) ([]byte, error)
}

// module is one loaded PKCS#11 library, initialised once for the process
// however many tokens of it are open: C_Initialize and C_Finalize are
// process-wide in PKCS#11, so the modules are kept in one registry.
type module struct {
	path string
	api  api
	refs int
}

// registry holds the loaded modules by path. It is the one piece of
// process-wide state in this package, because PKCS#11 itself is
// process-wide: a second C_Initialize of a module fails.
var registry = struct {
	sync.Mutex
	m map[string]*module
}{m: map[string]*module{}}

// loadModule returns the module at path, loading and initialising it on
// first use.
func loadModule(path string) (*module, error) {
	registry.Lock()
	defer registry.Unlock()
	if m, ok := registry.m[path]; ok {
		m.refs++
		return m, nil
	}
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("PKCS#11 module %s does not exist: fix module-path in the URI (SoftHSM2 is /usr/lib/softhsm/libsofthsm2.so, from apt-get install softhsm2)", path)
		}
		return nil, fmt.Errorf("PKCS#11 module %s: %w", path, err)
	}
	ctx := pkcs11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("PKCS#11 module %s cannot be loaded (not a shared library, or one of its dependencies is missing): fix module-path in the URI", path)
	}
	if err := ctx.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		ctx.Destroy()
		return nil, fmt.Errorf("PKCS#11 module %s: C_Initialize failed: %s; check the module's configuration (SoftHSM2: SOFTHSM2_CONF)", path, ckrName(err))
	}
	m := &module{path: path, api: ctx, refs: 1}
	registry.m[path] = m
	return m, nil
}

// release drops one user of m, finalising the module after the last.
func (m *module) release() {
	registry.Lock()
	defer registry.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	if registry.m[m.path] == m {
		delete(registry.m, m.path)
	}
	m.api.Finalize()
	m.api.Destroy()
}
