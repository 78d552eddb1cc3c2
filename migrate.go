package main

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"log/slog"
	"time"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
)

// schema.sql is the whole schema of a new database, for people to read; the server
// never runs it. Databases are built and upgraded by the numbered files in
// migrations/, and TestMigrationsMatchSchema keeps the two in agreement.
//
//go:embed schema.sql
var schemaSQL string

//go:embed migrations/*.sql
var migrationFiles embed.FS

// migrationTimeout bounds how long start-up spends on the migrations: generous,
// since an index built CONCURRENTLY on a large table takes a while, and cancelling
// it would leave an invalid index. The wait for another instance that holds the
// migration lock is bounded separately, by lockWait.
const (
	migrationTimeout = 30 * time.Minute
	lockWait         = 2 * time.Minute
)

// migrate brings the database up to the newest migration. Instances starting
// together take turns: goose's table lock (a row in goose_lock, not a session
// advisory lock, so it works through a transaction-mode pooler too) lets one
// migrate while the others wait, and each migration runs in its own transaction and
// is recorded in goose_db_version, so each is applied once, in order.
func migrate(ctx context.Context, db *sql.DB, logger *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, migrationTimeout)
	defer cancel()
	p, err := newMigrator(db)
	if err != nil {
		return err
	}
	results, err := p.Up(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	for _, r := range results {
		logger.Info("migration applied", "version", r.Source.Version, "file", r.Source.Path,
			"duration", r.Duration.Round(time.Millisecond))
	}
	return nil
}

// newMigrator returns a goose provider over the embedded migrations.
func newMigrator(db *sql.DB) (*goose.Provider, error) {
	files, err := fs.Sub(migrationFiles, "migrations")
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	locker, err := lock.NewPostgresTableLocker(
		lock.WithTableLockTimeout(500*time.Millisecond, uint64(lockWait/(500*time.Millisecond))),
	)
	if err != nil {
		return nil, fmt.Errorf("migration lock: %w", err)
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, files,
		goose.WithLocker(locker), goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	return p, nil
}
