-- Who is online is kept by the consumers since migration 0004: nothing reads the buckets
-- projection of 0003 any more, and every insert of events still built it (about a fifth of a
-- small insert's time). Dropped; the statements of 0003 stay as they were (a migration is never
-- edited), so a new database adds it and drops it at once.
ALTER TABLE {table:events} {on_cluster} DROP PROJECTION IF EXISTS buckets
