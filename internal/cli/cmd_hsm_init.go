package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// hsmInitOptions are the inputs of `keymig hsm init`.
type hsmInitOptions struct {
	Dir                         string
	Region                      string
	HSMs                        int
	AZs                         []string
	DisableKeyAvailabilityCheck bool
	KeyCapacity                 int
	NonFIPS                     bool
	KDFIterations               int // 0: the HSMs' default
	Output                      outputFormat
	Officer                     hsm.Credentials // the first crypto officer
	Network                     networkInitOptions
}

// hsmInitCommand is `keymig hsm init`.
func hsmInitCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "init",
		Usage: "create a new HSM cluster in a directory, with its first crypto officer",
		Description: `init creates a cluster of --hsms HSMs spread over availability zones, and
its first crypto officer (the PIN user:password from KEYMIG_PIN, --pin-file or
a prompt) on every HSM.

A cluster of one HSM always runs with the key availability check disabled,
as CloudHSM requires; with two or more HSMs a token key can be used only once
it is on at least 2 HSMs, unless --disable-key-availability-check is given.

A networked cluster (served by keymig hsm serve) gets --addresses, one
HOST:PORT per HSM, and a certificate signed by the customer's CA: --csr-out
writes the cluster's CSR, keymig hsm ca sign signs it offline, and
--signed-cert with --trust-anchor finishes. --customer-ca DIR does all three.

Examples:
  KEYMIG_PIN=admin:secret-pass keymig hsm init --dir ./hsm1
  KEYMIG_PIN=admin:secret-pass keymig hsm init --dir ./prod --region eu-west-1 --hsms 3 --azs eu-west-1a,eu-west-1b,eu-west-1c`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Required: true, Usage: "the new cluster `DIR`ectory (must not exist, or be empty)"},
			&cli.StringFlag{Name: "region", Value: "us-east-1", Usage: "the cluster's region"},
			&cli.IntFlag{Name: "hsms", Value: 1, Usage: "how many HSMs"},
			&cli.StringSliceFlag{Name: "azs", Usage: "availability zones, comma-separated, assigned round-robin", DefaultText: "REGIONa,REGIONb,REGIONc"},
			&cli.BoolFlag{Name: "disable-key-availability-check", Usage: "let token keys be used while on one HSM only (always so with one HSM)"},
			&cli.IntFlag{Name: "key-capacity", Value: 3300, Usage: "most token keys the cluster may hold"},
			&cli.BoolFlag{Name: "non-fips", Usage: "run the HSMs outside FIPS mode (allows PKCS#1 v1.5 key transport: hsm key wrap and unwrap --mechanism rsa-pkcs)"},
			kdfIterationsFlag("100000"),
			&cli.StringSliceFlag{Name: "addresses", Usage: "make a networked cluster: each HSM's `HOST:PORT`, comma-separated (needs --csr-out or --customer-ca)"},
			&cli.StringFlag{Name: "csr-out", Usage: "write the cluster's certificate signing request to `FILE`"},
			&cli.StringFlag{Name: "signed-cert", Usage: "finish a networked cluster: the cluster certificate `FILE` the customer CA signed"},
			&cli.StringFlag{Name: "trust-anchor", Usage: "with --signed-cert: the customer CA's certificate `FILE`, the only one clients trust"},
			&cli.StringFlag{Name: "customer-ca", Usage: "sign the CSR with the CA in `DIR` (keymig hsm ca create) and finish at once, for rehearsals"},
			pinFileFlag(),
			outputFlag(),
		},
		Action: func(c *cli.Context) error {
			out, err := commandOutput(c)
			if err != nil {
				return err
			}
			o := hsmInitOptions{
				Dir:                         c.String("dir"),
				Region:                      c.String("region"),
				HSMs:                        c.Int("hsms"),
				AZs:                         splitList(c.StringSlice("azs")),
				DisableKeyAvailabilityCheck: c.Bool("disable-key-availability-check"),
				KeyCapacity:                 c.Int("key-capacity"),
				NonFIPS:                     c.Bool("non-fips"),
				KDFIterations:               c.Int("kdf-iterations"),
				Output:                      out,
				Network: networkInitOptions{Addresses: splitList(c.StringSlice("addresses")), CSROut: c.String("csr-out"),
					SignedCert: c.String("signed-cert"), TrustAnchor: c.String("trust-anchor"), CustomerCA: c.String("customer-ca")},
			}
			if err := o.Network.validate(o.HSMs); err != nil {
				return err
			}
			if o.Network.SignedCert != "" {
				return runNetworkInitFinish(e, o.Dir, o.Network)
			}
			if err := o.validate(); err != nil {
				return err
			}
			if o.Officer, err = loadPIN(e, envPIN, c.String("pin-file"), "the first crypto officer of "+o.Dir); err != nil {
				return err
			}
			return runHSMInit(c.Context, e, o)
		},
	}
}

// validate checks the options before the PIN is asked for.
func (o hsmInitOptions) validate() error {
	if o.Dir == "" {
		return errors.New("--dir is required")
	}
	if o.HSMs < 1 {
		return fmt.Errorf("--hsms %d: a cluster needs at least one HSM", o.HSMs)
	}
	if o.KeyCapacity < 1 {
		return fmt.Errorf("--key-capacity %d: want a positive number of keys", o.KeyCapacity)
	}
	if o.Region == "" {
		return errors.New("--region must not be empty")
	}
	return checkKDFIterations(o.KDFIterations)
}

// minKDFIterations is the least password hashing cost a cluster may have.
const minKDFIterations = 1000

// kdfIterationsFlag is --kdf-iterations of hsm init and hsm restore.
func kdfIterationsFlag(def string) cli.Flag {
	return &cli.IntFlag{Name: "kdf-iterations", EnvVars: []string{"KEYMIG_KDF_ITERATIONS"}, DefaultText: def,
		Usage: "PBKDF2-SHA256 iterations of the cluster's password hashes (kept in its policy); lower it only for rehearsals and tests, where logins then cost less"}
}

// checkKDFIterations refuses a password hashing cost too low to mean anything.
func checkKDFIterations(n int) error {
	if n != 0 && n < minKDFIterations {
		return fmt.Errorf("--kdf-iterations %d: want at least %d (the default is 100000)", n, minKDFIterations)
	}
	return nil
}

// runHSMInit creates the cluster and prints what it made.
func runHSMInit(ctx context.Context, e *env, o hsmInitOptions) error {
	stdout, stderr := e.stdout, e.stderr
	if err := o.validate(); err != nil {
		return err
	}
	cl, err := cluster.Init(ctx, cluster.InitOptions{
		Dir:                         o.Dir,
		Region:                      o.Region,
		HSMs:                        o.HSMs,
		AZs:                         o.AZs,
		DisableKeyAvailabilityCheck: o.DisableKeyAvailabilityCheck,
		KeyCapacity:                 o.KeyCapacity,
		NonFIPS:                     o.NonFIPS,
		Officer:                     o.Officer,
		KDFIterations:               o.KDFIterations,
	})
	if err != nil {
		return inCluster(o.Dir, fmt.Errorf("init: %w", err))
	}
	info, notes := cl.Info(), cl.Notes()
	if err := cl.Close(); err != nil {
		return inCluster(o.Dir, err)
	}
	if o.Network.networked() {
		if err := startNetworkInit(e, o.Dir, info, o.Network); err != nil {
			return inCluster(o.Dir, fmt.Errorf("init: %w", err))
		}
	}
	if o.Output == outputJSON {
		return writeJSON(stdout, struct {
			Dir     string          `json:"dir"`
			Cluster hsm.ClusterInfo `json:"cluster"`
			Officer string          `json:"crypto-officer"`
			Notes   []string        `json:"notes"`
		}{o.Dir, info, o.Officer.User, nonNil(notes)})
	}
	fmt.Fprintf(stdout, "created cluster %s in %s (region %s, %d HSMs), crypto officer %s\n",
		info.ID, o.Dir, info.Region, len(info.HSMs), o.Officer.User)
	t := newTable(stdout, "HSM", "AZ", "STATE")
	for _, h := range info.HSMs {
		t.row(h.ID, h.AZ, h.State)
	}
	if err := t.flush(); err != nil {
		return err
	}
	for _, n := range notes {
		fmt.Fprintf(stderr, "note: %s\n", n)
	}
	return nil
}

// splitList splits comma-separated flag values ("a,b" or repeated flags) and
// drops empty items.
func splitList(vals []string) []string {
	var out []string
	for _, v := range vals {
		for _, s := range strings.Split(v, ",") {
			if s = strings.TrimSpace(s); s != "" {
				out = append(out, s)
			}
		}
	}
	return out
}
