package cluster

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestLockHelperProcess is not a test: TestDirLockOtherProcess runs the
// test binary as a second process that opens a cluster and holds it.
func TestLockHelperProcess(t *testing.T) {
	dir := os.Getenv("KEYMIG_CLUSTER_LOCK_HELPER")
	if dir == "" {
		t.Skip("helper process only")
	}
	c, err := Open(context.Background(), dir, OpenOptions{})
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println("locked")
	io.Copy(io.Discard, os.Stdin) // hold the lock until the parent closes stdin
	c.Close()
	os.Exit(0)
}

func TestDirLockOtherProcess(t *testing.T) {
	c := newCluster(t, 1)
	dir := c.Dir()
	c.Close()

	cmd := exec.Command(os.Args[0], "-test.run=^TestLockHelperProcess$")
	cmd.Env = append(os.Environ(), "KEYMIG_CLUSTER_LOCK_HELPER="+dir)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer stdin.Close()
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	if strings.TrimSpace(line) != "locked" {
		t.Fatalf("helper said %q", line)
	}
	_, err := Open(context.Background(), dir, OpenOptions{LockTimeout: 200 * time.Millisecond})
	if err == nil {
		t.Fatal("Open of a directory another process holds succeeded")
	}
	for _, want := range []string{dir, fmt.Sprintf("pid %d", cmd.Process.Pid)} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %q", err, want)
		}
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
	c2, err := Open(context.Background(), dir, OpenOptions{LockTimeout: 2 * time.Second})
	if err != nil {
		t.Fatalf("Open after the other process left: %v", err)
	}
	c2.Close()
}
