package cli

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// hsmBackupOptions are the inputs of `keymig hsm backup create` and `list`.
type hsmBackupOptions struct {
	clusterOptions
	Out   string // create: where to write the backup, besides DIR/backups/
	Force bool
}

// hsmBackupCommand is `keymig hsm backup`.
func hsmBackupCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "backup",
		Usage: "create and list encrypted backups of a cluster",
		Description: `A backup holds the cluster's users, keys and policy, encrypted under a key
derived from the cluster's lineage secret; its source cluster, region and
time are in the clear. Restoring it (keymig hsm restore) makes a clone that
shares the lineage. As with CloudHSM, where backups are a cluster operation
and not an HSM login, these commands need no PIN.`,
		Subcommands: []*cli.Command{
			{
				Name:  "create",
				Usage: "write a backup of the cluster to a file (mode 0600), also kept under DIR/backups/",
				Description: `Example:
  keymig hsm backup create --cluster ./hsm1 --out hsm1.backup`,
				Flags: append(clusterFlags(false),
					&cli.StringFlag{Name: "out", Required: true, Usage: "the backup `FILE` to write"},
					&cli.BoolFlag{Name: "force", Usage: "replace --out if it exists"}),
				Action: func(c *cli.Context) error {
					co, err := e.clusterOptionsFrom(c, false)
					if err != nil {
						return err
					}
					return runHSMBackupCreate(c.Context, e, hsmBackupOptions{clusterOptions: co, Out: c.String("out"), Force: c.Bool("force")})
				},
			},
			{
				Name:  "list",
				Usage: "list the backups kept in the cluster directory, newest first",
				Description: `Example:
  keymig hsm backup list --cluster ./hsm1`,
				Flags: clusterFlags(false),
				Action: func(c *cli.Context) error {
					co, err := e.clusterOptionsFrom(c, false)
					if err != nil {
						return err
					}
					return runHSMBackupList(c.Context, e, hsmBackupOptions{clusterOptions: co})
				},
			},
		},
	}
}

// runHSMBackupCreate writes a backup of the cluster to o.Out.
func runHSMBackupCreate(ctx context.Context, e *env, o hsmBackupOptions) error {
	stdout := e.stdout
	if err := refuseExistingOutput(o.Out, o.Force); err != nil {
		return err
	}
	return withCluster(ctx, o.clusterOptions, func(cl *cluster.Cluster) error {
		info, err := cl.Backup(ctx, o.Out)
		if err != nil {
			return inCluster(o.Dir, err)
		}
		if o.Output == outputJSON {
			return writeJSON(stdout, struct {
				Cluster string             `json:"cluster"`
				Backup  cluster.BackupInfo `json:"backup"`
			}{o.Dir, info})
		}
		_, err = fmt.Fprintf(stdout, "wrote backup %s of cluster %s (%s, %d token keys, %d users) to %s\n",
			info.ID, info.ClusterID, info.Region, info.Keys, info.Users, o.Out)
		return err
	})
}

// runHSMBackupList lists the backups kept in the cluster directory.
func runHSMBackupList(ctx context.Context, e *env, o hsmBackupOptions) error {
	stdout := e.stdout
	backups, err := cluster.ListBackups(o.Dir)
	if err != nil {
		return inCluster(o.Dir, fmt.Errorf("list backups: %w", err))
	}
	if o.Output == outputJSON {
		return writeJSON(stdout, struct {
			Cluster string               `json:"cluster"`
			Backups []cluster.BackupInfo `json:"backups"`
		}{o.Dir, nonNil(backups)})
	}
	t := newTable(stdout, "BACKUP", "CREATED", "SOURCE-CLUSTER", "REGION", "KEYS", "USERS", "PATH")
	for _, b := range backups {
		t.row(b.ID, b.Created.UTC().Format(time.RFC3339), b.ClusterID, b.Region, fmt.Sprint(b.Keys), fmt.Sprint(b.Users), b.Path)
	}
	return t.flush()
}

// hsmRestoreOptions are the inputs of `keymig hsm restore`.
type hsmRestoreOptions struct {
	Backup                      string
	Dir                         string
	Region                      string
	HSMs                        int
	AZs                         []string
	DisableKeyAvailabilityCheck bool
	KDFIterations               int // 0: the backup's
	Output                      outputFormat
}

// hsmRestoreCommand is `keymig hsm restore`.
func hsmRestoreCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "restore",
		Usage: "make a clone of a cluster from a backup, in a new directory and region",
		Description: `The clone gets a new cluster id but the same lineage, users and keys, with
the same key references and check values; masked objects (keymig sync) move
between it and the original. It needs no PIN: the users and their passwords
come from the backup.

Example:
  keymig hsm backup create --cluster ./hsm1 --out hsm1.backup
  keymig hsm restore --backup hsm1.backup --dir ./hsm1-dr --region eu-west-1 --hsms 2`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "backup", Required: true, Usage: "the backup `FILE`"},
			&cli.StringFlag{Name: "dir", Required: true, Usage: "the new cluster `DIR`ectory (must not exist, or be empty)"},
			&cli.StringFlag{Name: "region", Usage: "the clone's region", DefaultText: "the backup's region"},
			&cli.IntFlag{Name: "hsms", Value: 1, Usage: "how many HSMs"},
			&cli.StringSliceFlag{Name: "azs", Usage: "availability zones, comma-separated", DefaultText: "REGIONa,REGIONb,REGIONc"},
			&cli.BoolFlag{Name: "disable-key-availability-check", Usage: "let token keys be used while on one HSM only (always so with one HSM)"},
			kdfIterationsFlag("the backup's"),
			outputFlag(),
		},
		Action: func(c *cli.Context) error {
			out, err := commandOutput(c)
			if err != nil {
				return err
			}
			return runHSMRestore(c.Context, e, hsmRestoreOptions{
				Backup: c.String("backup"), Dir: c.String("dir"), Region: c.String("region"),
				HSMs: c.Int("hsms"), AZs: splitList(c.StringSlice("azs")),
				DisableKeyAvailabilityCheck: c.Bool("disable-key-availability-check"), KDFIterations: c.Int("kdf-iterations"), Output: out,
			})
		},
	}
}

// runHSMRestore makes the clone and prints it.
func runHSMRestore(ctx context.Context, e *env, o hsmRestoreOptions) error {
	stdout, stderr := e.stdout, e.stderr
	if o.Backup == "" || o.Dir == "" {
		return errors.New("restore needs --backup FILE and --dir DIR")
	}
	if o.HSMs < 1 {
		return fmt.Errorf("--hsms %d: a cluster needs at least one HSM", o.HSMs)
	}
	if err := checkKDFIterations(o.KDFIterations); err != nil {
		return err
	}
	src, err := cluster.ReadBackupInfo(o.Backup)
	if err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	cl, err := cluster.Restore(ctx, cluster.RestoreOptions{Backup: o.Backup, Dir: o.Dir, Region: o.Region,
		HSMs: o.HSMs, AZs: o.AZs, DisableKeyAvailabilityCheck: o.DisableKeyAvailabilityCheck, KDFIterations: o.KDFIterations})
	if err != nil {
		return inCluster(o.Dir, fmt.Errorf("restore %s: %w", o.Backup, err))
	}
	info, notes := cl.Info(), cl.Notes()
	if err := cl.Close(); err != nil {
		return inCluster(o.Dir, err)
	}
	if o.Output == outputJSON {
		return writeJSON(stdout, struct {
			Dir     string             `json:"dir"`
			Cluster hsm.ClusterInfo    `json:"cluster"`
			Backup  cluster.BackupInfo `json:"backup"`
			Notes   []string           `json:"notes"`
		}{o.Dir, info, src, nonNil(notes)})
	}
	fmt.Fprintf(stdout, "restored backup %s of cluster %s (%s) into clone %s in %s (region %s, %d HSMs, %d token keys)\n",
		src.ID, src.ClusterID, src.Region, info.ID, o.Dir, info.Region, len(info.HSMs), src.Keys)
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
