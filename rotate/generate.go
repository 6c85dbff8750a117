package rotate

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/keymig/keymig/hsm"
)

// GenerateConfig asks for a data-key file made by the HSM: each data key
// is generated inside it as a session object, wrapped under the master and
// deleted. For demos, tests and benchmarks.
type GenerateConfig struct {
	Cluster Side
	Master  hsm.Filter
	Count   int
	Alg     string // default aes-kwp
	Bits    int    // data key size; default 256
	Workers int    // data keys made at once; default 64
	// IDPrefix starts every record's id; default "dk-".
	IDPrefix string
	// Progress is told about each record; may be nil.
	Progress interface{ Finished(ok bool) }
}

// genRecord is a generated line; its field order is the file's.
type genRecord struct {
	ID         string `json:"id"`
	Master     Master `json:"master"`
	Alg        string `json:"alg"`
	Ciphertext []byte `json:"ciphertext"`
}

// Generate writes cfg.Count records to w in id order and returns the
// master they are wrapped under.
func Generate(ctx context.Context, cfg GenerateConfig, w io.Writer) (hsm.KeyInfo, error) {
	if cfg.Alg == "" {
		cfg.Alg = AlgKWP
	}
	if cfg.Bits == 0 {
		cfg.Bits = 256
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 64
	}
	if cfg.IDPrefix == "" {
		cfg.IDPrefix = "dk-"
	}
	ss := cfg.Cluster.Sessions
	if len(ss) == 0 {
		return hsm.KeyInfo{}, fmt.Errorf("cluster %s: no session to work with", cfg.Cluster.Name)
	}
	m, err := findMaster(ctx, ss[0], cfg.Cluster.Name, cfg.Master, AnyMaster)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	if !m.Attrs.Wrap {
		return m.KeyInfo, fmt.Errorf("the master %s cannot wrap (wrap=false); its owner can set wrap=true if it is modifiable", m)
	}
	master := Master{Label: m.Label, KCV: m.KCV.String()}
	bw := bufio.NewWriterSize(w, 1<<20)
	const chunk = 1024
	cts := make([][]byte, chunk)
	var laneN atomic.Uint64
	for first := 0; first < cfg.Count; first += chunk {
		n := min(chunk, cfg.Count-first)
		var next atomic.Int64
		var wg sync.WaitGroup
		var mu sync.Mutex
		var firstErr error
		for range min(cfg.Workers, n) {
			wg.Go(func() {
				for {
					i := int(next.Add(1) - 1)
					if i >= n {
						return
					}
					s := ss[laneN.Add(1)%uint64(len(ss))]
					ct, err := generateOne(ctx, s, m.Ref, cfg.Bits, mech(cfg.Alg))
					if err != nil {
						mu.Lock()
						if firstErr == nil {
							firstErr = fmt.Errorf("cluster %s: data key %d: %w", cfg.Cluster.Name, first+i+1, err)
						}
						mu.Unlock()
						return
					}
					cts[i] = ct
				}
			})
		}
		wg.Wait()
		if firstErr != nil {
			return m.KeyInfo, firstErr
		}
		for i := range n {
			b, _ := json.Marshal(genRecord{ID: fmt.Sprintf("%s%08d", cfg.IDPrefix, first+i+1), Master: master, Alg: cfg.Alg, Ciphertext: cts[i]})
			bw.Write(b)
			if err := bw.WriteByte('\n'); err != nil {
				return m.KeyInfo, err
			}
			if cfg.Progress != nil {
				cfg.Progress.Finished(true)
			}
		}
		if ctx.Err() != nil {
			return m.KeyInfo, ctx.Err()
		}
	}
	return m.KeyInfo, bw.Flush()
}

// generateOne makes one data key inside the HSM and returns it wrapped.
func generateOne(ctx context.Context, s Session, master hsm.KeyRef, bits int, m hsm.Mechanism) ([]byte, error) {
	k, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: bits, Template: sessionTemplate()})
	if err != nil {
		return nil, fmt.Errorf("generating a data key: %w", err)
	}
	ct, err := wrapWith(ctx, s, m, master, k.Ref)
	if derr := drop(ctx, s, k.Ref); derr != nil && err == nil {
		err = fmt.Errorf("deleting session object %s: %w", k.Ref, derr)
	}
	if err != nil {
		return nil, fmt.Errorf("wrapping a data key under %s: %w", master, err)
	}
	return ct, nil
}
