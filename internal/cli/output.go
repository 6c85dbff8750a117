package cli

// Output: every command that reports something prints either aligned text
// tables for people or JSON for programs (--output json). The JSON shapes
// are part of keymig's interface: fields are only ever added, never renamed.

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/urfave/cli/v2"
)

// outputFormat is how a command prints its results.
type outputFormat string

// The output formats.
const (
	outputText outputFormat = "text"
	outputJSON outputFormat = "json"
)

// outputFlag is the --output flag every reporting command takes.
func outputFlag() cli.Flag {
	return &cli.StringFlag{Name: "output", Aliases: []string{"o"}, Value: string(outputText),
		Usage: "how to print results: text (aligned tables) or json (stable, for programs)"}
}

// parseOutput checks an --output value.
func parseOutput(s string) (outputFormat, error) {
	switch f := outputFormat(strings.ToLower(strings.TrimSpace(s))); f {
	case outputText, outputJSON:
		return f, nil
	case "":
		return outputText, nil
	}
	return "", fmt.Errorf("--output %q: want text or json", s)
}

// commandOutput checks that a command got only flags and reads its
// --output format: the start of every command that reports something.
func commandOutput(c *cli.Context) (outputFormat, error) {
	if err := noArgs(c); err != nil {
		return "", err
	}
	return parseOutput(c.String("output"))
}

// writeJSON prints v as indented JSON followed by a newline.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

// table prints aligned columns. Cells are separated by tabs; Flush must be
// called once every row is written.
type table struct {
	tw *tabwriter.Writer
}

// newTable starts a table on w, optionally with a header row.
func newTable(w io.Writer, header ...string) *table {
	t := &table{tw: tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)}
	if len(header) > 0 {
		t.row(header...)
	}
	return t
}

// row writes one row of cells; an empty cell shows as "-".
func (t *table) row(cells ...string) {
	for i, c := range cells {
		if c == "" {
			c = "-"
		}
		if i > 0 {
			io.WriteString(t.tw, "\t")
		}
		io.WriteString(t.tw, strings.ReplaceAll(c, "\t", " "))
	}
	io.WriteString(t.tw, "\n")
}

// flush writes the aligned table out.
func (t *table) flush() error { return t.tw.Flush() }

// joinOrDash joins s with commas, or returns "-" for an empty list, for
// table cells.
func joinOrDash(s []string) string {
	if len(s) == 0 {
		return "-"
	}
	return strings.Join(s, ",")
}

// nonNil returns s, or an empty slice instead of nil, so JSON shows [] rather
// than null.
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// plural formats a count with its noun: "1 key", "3 keys".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}
