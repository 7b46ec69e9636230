-- The microseconds of an event's time past its millisecond ``ts`` (0-999, the record's ``ts_us``):
-- what orders two events of one visitor within one millisecond, which two ingest processes may
-- put in the log out of that order. Rows of before have 0 (their order is the log's).
-- On a cluster, the replicated tables and then the Distributed table over them.
ALTER TABLE {table:events} {on_cluster} ADD COLUMN IF NOT EXISTS micros UInt16 DEFAULT 0 AFTER ts;
ALTER TABLE events {on_cluster} ADD COLUMN IF NOT EXISTS micros UInt16 DEFAULT 0 AFTER ts
