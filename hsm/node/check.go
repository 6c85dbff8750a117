package node

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"time"

	bolt "go.etcd.io/bbolt"
)

// CheckFile checks an HSM's files while no process has them open: bbolt's
// page consistency check of the HSM file at path, then the audit log's hash
// chain against the head recorded in that file. It changes nothing (a torn
// last audit line, which Open would cut, is reported) and returns the
// number of audit records and every problem found. Tests run it on every
// HSM file they made, as bbolt's btesting checks each database.
func CheckFile(path string) (records int, err error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		return 0, fmt.Errorf("hsm file %s: %w", path, err)
	}
	defer db.Close()
	var errs []error
	var head auditHead
	err = db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			errs = append(errs, fmt.Errorf("hsm file %s: bbolt: %w", path, err))
		}
		if tx.Bucket(bktMeta) == nil {
			return errors.New("not an HSM file: it has no meta bucket")
		}
		var err error
		head, err = readHead(tx)
		return err
	})
	if err != nil {
		return 0, errors.Join(append(errs, fmt.Errorf("hsm file %s: %w", path, err))...)
	}
	f, err := os.Open(AuditPath(path))
	if err != nil {
		return 0, errors.Join(append(errs, fmt.Errorf("audit log of %s: %w", path, err))...)
	}
	defer f.Close()
	records, err = verifyChain(&lineReader{r: bufio.NewReaderSize(f, 64<<10)}, head)
	if err != nil {
		errs = append(errs, fmt.Errorf("audit log %s is not intact: %w", AuditPath(path), err))
	}
	return records, errors.Join(errs...)
}
