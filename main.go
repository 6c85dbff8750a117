// Command keymig moves keys between HSM clusters and keeps cloned clusters
// in sync: it plans, then executes the plan as a resumable job recorded in
// a bbolt journal. The commands live in internal/cli.
package main

import (
	"os"

	"github.com/keymig/keymig/internal/cli"
)

func main() {
	os.Exit(cli.Run(os.Args, os.Stdin, os.Stdout, os.Stderr))
}
