package main

import (
	"context"
	"fmt"
	"time"
)

// The event log keeps each event for EVENT_RETENTION: pruneEvents deletes older ones
// every EVENT_PRUNE_INTERVAL, pruneBatch rows per statement with prunePause between
// statements, so that each statement is short, holds only the row locks of the
// events it deletes (which nothing else writes after their insert) and leaves the
// database to the sends in between. A stream that resumes from a position the log
// no longer holds gets a reset frame (see resumePoint); messages themselves are
// kept, only the record of their delivery goes.
//
// Batched DELETE, rather than a log partitioned by time whose old partitions are
// dropped: pruning costs the sends 12 to 17% while it runs (docs/limits.md), and a
// partitioned events table could not keep (user_id, seq) unique, since its primary
// key would have to include created_at, and every resume and replay would probe
// each partition.
const (
	pruneBatch = 5000
	prunePause = 50 * time.Millisecond
)

// pruneEvents deletes the events older than the retention, batch by batch, until
// none is left or ctx is done.
func (s *server) pruneEvents(ctx context.Context) {
	for {
		n, err := s.deleteOldEvents(ctx)
		if err != nil {
			if ctx.Err() == nil {
				s.logger.Warn("prune event log", "err", err)
			}
			return
		}
		s.metrics.eventsPruned.Add(float64(n))
		if n < pruneBatch {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(prunePause):
		}
	}
}

// deleteOldEvents deletes up to pruneBatch of the oldest events past the retention,
// found through the index on created_at, and returns how many it deleted. The rows
// are locked as they are found, skipping any that another instance's pruner holds,
// so pruners running at once share the work instead of waiting on each other (or
// deadlocking, as two DELETEs of the same rows in different orders would).
func (s *server) deleteOldEvents(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	res, err := s.db.ExecContext(ctx, `
		DELETE FROM events WHERE (user_id, seq) IN (
			SELECT user_id, seq FROM events
			WHERE created_at < now() - make_interval(secs => $1)
			ORDER BY created_at LIMIT $2
			FOR UPDATE SKIP LOCKED)`, s.cfg.eventRetention.Seconds(), pruneBatch)
	if err != nil {
		return 0, fmt.Errorf("delete old events: %w", err)
	}
	return res.RowsAffected()
}
