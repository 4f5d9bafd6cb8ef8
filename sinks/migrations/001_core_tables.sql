-- 001: the tables the sink writes (DESIGN §6). ${db} is the configured database.
-- Statements end with ";" at the end of a line; each one is idempotent (IF NOT EXISTS).
--
-- non_replicated_deduplication_window: plain MergeTree tables only honour
-- insert_deduplication_token when this window is set (replicated tables always do), so a
-- retried sink batch carrying the same token is stored once on chDB and on a single server.

-- Raw priced events, one row per model call.
-- ReplacingMergeTree keyed on (user_id, occurred_at, event_id): a replayed event (same event_id,
-- same user, same event time, so the same month partition) collapses into one row; queries that
-- must count exactly read it with FINAL. plan_id is deliberately NOT in the key: it is derived
-- from the subscription schedule when the event is priced, and a re-pricing after a schedule
-- change must replace the row, not add a second one under another plan. Per-tier scans use the
-- set skip index on plan_id. The version column keeps the latest pricing of an event.
CREATE TABLE IF NOT EXISTS ${db}.priced_events (
    event_id String,
    occurred_at DateTime64(6, 'UTC'),
    org_id LowCardinality(String),
    user_id String,
    api_key_id Nullable(String),
    gateway LowCardinality(String),
    request_id Nullable(String),
    provider LowCardinality(Nullable(String)),
    requested_model LowCardinality(String),
    served_model LowCardinality(String),
    input_tokens UInt64,
    cached_input_tokens UInt64,
    cache_write_tokens UInt64,
    output_tokens UInt64,
    reasoning_tokens UInt64,
    semantic_cache_hit Bool,
    status LowCardinality(String),
    latency_ms Nullable(UInt32),
    feature LowCardinality(Nullable(String)),
    attributes Map(String, String),
    plan_id LowCardinality(String),
    cost Decimal(38, 24),
    list_value Decimal(38, 24),
    saved_prompt_cache Decimal(38, 24),
    saved_semantic_cache Decimal(38, 24),
    saved_routing Decimal(38, 24),
    unknown_model Bool,
    late Bool,
    window_start DateTime64(6, 'UTC'),
    processed_at DateTime64(6, 'UTC'),
    INDEX plan_idx plan_id TYPE set(256) GRANULARITY 4
) ENGINE = ReplacingMergeTree(processed_at)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (user_id, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- Rollups are upserts: the stream re-emits a window's full value with a higher version when a
-- late event changes it. ReplacingMergeTree(version) keeps the highest version per key; a
-- Summing/AggregatingMergeTree would add the re-emitted value a second time. Read with FINAL.
CREATE TABLE IF NOT EXISTS ${db}.rollups (
    user_id String,
    org_id LowCardinality(String),
    plan_id LowCardinality(String),
    served_model LowCardinality(String),
    window_start DateTime64(6, 'UTC'),
    window_end DateTime64(6, 'UTC'),
    segment UInt64,
    requests UInt64,
    input_tokens UInt64,
    cached_input_tokens UInt64,
    cache_write_tokens UInt64,
    output_tokens UInt64,
    reasoning_tokens UInt64,
    semantic_cache_hits UInt64,
    cost Decimal(38, 24),
    list_value Decimal(38, 24),
    version UInt64,
    updated_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (user_id, served_model, window_start, segment)
SETTINGS non_replicated_deduplication_window = 1000;

-- Dead letters: the original bytes (payload, decoded from payload_b64) with the reason and the
-- stage. Keyed by where the message came from, so a replayed DLQ record is stored once.
CREATE TABLE IF NOT EXISTS ${db}.dead_letters (
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    stage LowCardinality(String),
    key Nullable(String),
    payload String,
    reason String,
    received_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY (source_topic, source_partition, source_offset, stage)
SETTINGS non_replicated_deduplication_window = 1000;
