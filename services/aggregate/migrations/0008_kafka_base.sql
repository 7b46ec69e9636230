-- Where a row's record was in Kafka: its Kafka offset is kafka_offset - kafka_base. Progress is
-- kept as one position per partition that only grows (kafka_offset, consume.py); a partition's
-- log that was lost and begun again (the topic deleted and made anew, a broker that kept its log
-- in memory restarted) goes on from where the lost one ended, with a new base. Rows of before
-- have 0: their position is their Kafka offset. On a cluster, the replicated tables and then the
-- Distributed table over them.
ALTER TABLE {table:events} {on_cluster} ADD COLUMN IF NOT EXISTS kafka_base Int64 DEFAULT 0 AFTER kafka_offset;
ALTER TABLE events {on_cluster} ADD COLUMN IF NOT EXISTS kafka_base Int64 DEFAULT 0 AFTER kafka_offset
