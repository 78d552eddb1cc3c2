-- The event log's retention (EVENT_RETENTION): the pruner deletes the oldest events
-- in small batches, found by created_at. Built CONCURRENTLY, outside a transaction,
-- so that upgrading a large log does not block sends while the index is built.
-- A concurrent build that was interrupted (the instance killed, the build
-- cancelled) leaves an INVALID index of the same name behind, which CREATE ... IF
-- NOT EXISTS would take as done: so any index of that name is dropped first. This
-- migration runs once, so that drops nothing that a finished run built.

-- +goose NO TRANSACTION
-- +goose Up
DROP INDEX CONCURRENTLY IF EXISTS events_created;
CREATE INDEX CONCURRENTLY events_created ON events (created_at);

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS events_created;
