-- The event log's retention (EVENT_RETENTION): the pruner deletes the oldest events
-- in small batches, found by created_at. Built CONCURRENTLY, outside a transaction,
-- so that upgrading a large log does not block sends while the index is built.

-- +goose NO TRANSACTION
-- +goose Up
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_created ON events (created_at);

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS events_created;
