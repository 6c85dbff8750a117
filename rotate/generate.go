package rotate

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
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
	bw := bufio.NewWriterSize(w, 1<<20)
	m, err := generate(ctx, &cfg, func(rows []TableRow) error {
		for _, r := range rows {
			b, _ := json.Marshal(genRecord{ID: r.Key, Master: r.Master, Alg: r.Alg, Ciphertext: r.Ciphertext})
			bw.Write(b)
			if err := bw.WriteByte('\n'); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return m, err
	}
	return m, bw.Flush()
}

// GenerateTable adds cfg.Count rows to a data-key table and returns the
// master they are wrapped under.
func GenerateTable(ctx context.Context, cfg GenerateConfig, t TableFiller) (hsm.KeyInfo, error) {
	return generate(ctx, &cfg, func(rows []TableRow) error { return t.Fill(ctx, rows) })
}

// generate makes the data keys in chunks and hands each chunk to emit.
func generate(ctx context.Context, cfg *GenerateConfig, emit func([]TableRow) error) (hsm.KeyInfo, error) {
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
	const chunk = 1024
	rows := make([]TableRow, chunk)
	var laneN atomic.Uint64
	for first := 0; first < cfg.Count; first += chunk {
		n := min(chunk, cfg.Count-first)
		err := forEach(ctx, n, cfg.Workers, func(i int) error {
			s := ss[laneN.Add(1)%uint64(len(ss))]
			ct, err := generateOne(ctx, s, m.Ref, cfg.Bits, mech(cfg.Alg))
			if err != nil {
				return fmt.Errorf("cluster %s: data key %d: %w", cfg.Cluster.Name, first+i+1, err)
			}
			rows[i] = TableRow{Key: fmt.Sprintf("%s%08d", cfg.IDPrefix, first+i+1), Master: master, Alg: cfg.Alg, Ciphertext: ct}
			return nil
		})
		if err != nil {
			return m.KeyInfo, err
		}
		if err := emit(rows[:n]); err != nil {
			return m.KeyInfo, err
		}
		if cfg.Progress != nil {
			for range n {
				cfg.Progress.Finished(true)
			}
		}
	}
	return m.KeyInfo, nil
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
