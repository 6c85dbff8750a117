package failpoint

// The points, in the order a key passes them. Each sits between two
// durable effects (a journal commit, an HSM's commit, a file write), so
// that a kill there leaves the state a real crash at that moment would.
const (
	// RunnerBeforeItem is passed before the runner starts an item (a Wait point).
	RunnerBeforeItem Point = "runner/before-item"
	// JournalBeforeCommit is passed before a journal item transition is committed.
	JournalBeforeCommit Point = "journal/before-commit"
	// JournalAfterCommit is passed once a journal item transition is on disk.
	JournalAfterCommit Point = "journal/after-commit"

	// MigrateAfterSourceExport is passed when the source has wrapped (or exported) a key, before "acting" is committed.
	MigrateAfterSourceExport Point = "migrate/after-source-export"
	// MigrateAfterActing is passed when "acting" is committed, before the non-idempotent target call.
	MigrateAfterActing Point = "migrate/after-acting"
	// MigrateAfterTargetUnwrap is passed when the target has made the key (unwrap, insert, import or a new master), before it is checked and recorded.
	MigrateAfterTargetUnwrap Point = "migrate/after-target-unwrap"
	// MigrateBeforeDone is passed when a key is checked and covered, before it is recorded done.
	MigrateBeforeDone Point = "migrate/before-done"

	// ClusterAfterHomeWrite is passed when one HSM has made a token key, before it is copied to the others.
	ClusterAfterHomeWrite Point = "cluster/after-home-write-before-copy"
	// ClusterAfterCopy is passed when a new token key has been copied to the other HSMs, before the caller hears of it.
	ClusterAfterCopy Point = "cluster/after-copy"

	// NodeAfterAuditAppend is passed when an HSM has appended a change's audit record, before the change is committed.
	NodeAfterAuditAppend Point = "node/after-audit-append"
	// NodeAfterCommit is passed when an HSM has committed a change, before its audit record is known to be on disk.
	NodeAfterCommit Point = "node/after-commit"

	// RotateAfterSessionUnwrap is passed when a data key is in a session object, before it is wrapped again.
	RotateAfterSessionUnwrap Point = "rotate/after-session-unwrap"
	// RotateBeforeTableSwap is passed when a page of a table is re-encrypted, before it is written back.
	RotateBeforeTableSwap Point = "rotate/before-table-swap"
	// RotateAfterTableSwap is passed when a page of a table is written back, before the journal records it.
	RotateAfterTableSwap Point = "rotate/after-table-swap"
	// RotateAfterBatchWrite is passed when a batch's output is written to the partial file, before the batch is recorded done.
	RotateAfterBatchWrite Point = "rotate/after-batch-write"
	// RotateBeforeFsync is passed when every batch is written, before the partial files are synced.
	RotateBeforeFsync Point = "rotate/before-fsync"
	// RotateAfterFsync is passed when the partial files are synced, before the output is checked against the input.
	RotateAfterFsync Point = "rotate/after-fsync"
	// RotateBeforeRename is passed when the output is checked, before the rejects and then the output are renamed into place.
	RotateBeforeRename Point = "rotate/before-rename"
	// RotateAfterRename is passed when the output is in place, before the run is recorded done.
	RotateAfterRename Point = "rotate/after-rename"

	// SynckeyAfterInserting is passed when "inserting" is committed, before the masked insert into the target.
	SynckeyAfterInserting Point = "synckey/after-inserting"
	// SynckeyAfterInsert is passed when the target has stored the masked object, before it is read back and recorded done.
	SynckeyAfterInsert Point = "synckey/after-insert"
	// SynckeyAfterDeleting is passed when "deleting" is committed, before a pruned key is deleted.
	SynckeyAfterDeleting Point = "synckey/after-deleting"
	// SynckeyBetweenSyncs is passed when a scheduled sync goes to sleep until its next run (a Wait point).
	SynckeyBetweenSyncs Point = "synckey/between-syncs"
)

// Doc describes a point.
type Doc struct {
	Point Point
	// Wait says the point is passed with a context (Wait), so pause works.
	Wait bool
}

// points is every point; Enable refuses a name not listed here.
var points = []Doc{
	{Point: RunnerBeforeItem, Wait: true},
	{Point: JournalBeforeCommit},
	{Point: JournalAfterCommit},
	{Point: MigrateAfterSourceExport},
	{Point: MigrateAfterActing},
	{Point: MigrateAfterTargetUnwrap},
	{Point: MigrateBeforeDone},
	{Point: ClusterAfterHomeWrite},
	{Point: ClusterAfterCopy},
	{Point: NodeAfterAuditAppend},
	{Point: NodeAfterCommit},
	{Point: RotateAfterSessionUnwrap},
	{Point: RotateAfterBatchWrite},
	{Point: RotateBeforeTableSwap},
	{Point: RotateAfterTableSwap},
	{Point: RotateBeforeFsync},
	{Point: RotateAfterFsync},
	{Point: RotateBeforeRename},
	{Point: RotateAfterRename},
	{Point: SynckeyAfterInserting},
	{Point: SynckeyAfterInsert},
	{Point: SynckeyAfterDeleting},
	{Point: SynckeyBetweenSyncs, Wait: true},
}

// All lists every point, in the order above.
func All() []Doc { return append([]Doc(nil), points...) }
