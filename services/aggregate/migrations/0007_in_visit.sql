-- Whether the visitor's run of events had its visit as of the row (counting.Row.in_visit): 0
-- while a run that began with a heartbeat or a leave waits for its first page view, which then
-- begins the visit. A rebuild reads it of a run that began before the rows it replays. Rows of
-- before have 1 (their runs counted as having their visit, as the rules of then made them).
-- On a cluster, the replicated tables and then the Distributed table over them.
ALTER TABLE {table:events} {on_cluster} ADD COLUMN IF NOT EXISTS in_visit UInt8 DEFAULT 1 AFTER starts_visit;
ALTER TABLE events {on_cluster} ADD COLUMN IF NOT EXISTS in_visit UInt8 DEFAULT 1 AFTER starts_visit
