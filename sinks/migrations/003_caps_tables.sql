-- 003: what the caps stage emits (DESIGN §5). Every record carries a deterministic id, so each
-- table is a ReplacingMergeTree on that id: a record delivered twice (at-least-once, a replay
-- after a crash) is stored once. Read with FINAL for exact counts.

-- Threshold and break-even alerts: once per (user, window instance, threshold) by alert_id.
CREATE TABLE IF NOT EXISTS ${db}.alerts (
    alert_id String,
    kind LowCardinality(String),
    user_id String,
    org_id LowCardinality(String),
    plan_id LowCardinality(String),
    window LowCardinality(String),
    window_id String,
    window_kind LowCardinality(String),
    unit LowCardinality(String),
    threshold UInt16,
    usage Decimal(38, 24),
    limit Decimal(38, 24),
    window_start DateTime64(6, 'UTC'),
    window_end DateTime64(6, 'UTC'),
    event_id String,
    event_time DateTime64(6, 'UTC'),
    detected_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (user_id, alert_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- Every enforcement change of a user (the compacted topic keeps only the latest; this keeps the
-- history). version grows by one per record of a user.
CREATE TABLE IF NOT EXISTS ${db}.enforcement_changes (
    user_id String,
    org_id LowCardinality(String),
    plan_id LowCardinality(String),
    state LowCardinality(String),
    reason LowCardinality(String),
    window LowCardinality(Nullable(String)),
    window_id Nullable(String),
    unit LowCardinality(Nullable(String)),
    usage Nullable(Decimal(38, 24)),
    limit Nullable(Decimal(38, 24)),
    remaining Nullable(Decimal(38, 24)),
    until Nullable(DateTime64(6, 'UTC')),
    downgrade_to LowCardinality(Nullable(String)),
    as_of DateTime64(6, 'UTC'),
    version UInt64,
    updated_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(as_of)
ORDER BY (user_id, version)
SETTINGS non_replicated_deduplication_window = 1000;

-- Overage billed per event (record = 'overage': billing sums amount) and prepaid credit drawn
-- before it (record = 'credit_draw'). Per window instance, credit quantity + overage quantity
-- equals the usage beyond the allowance.
CREATE TABLE IF NOT EXISTS ${db}.overages (
    record LowCardinality(String),
    id String,
    user_id String,
    org_id LowCardinality(String),
    plan_id LowCardinality(String),
    window LowCardinality(String),
    window_id String,
    window_start Nullable(DateTime64(6, 'UTC')),
    window_end Nullable(DateTime64(6, 'UTC')),
    unit LowCardinality(String),
    event_id String,
    event_time DateTime64(6, 'UTC'),
    quantity Decimal(38, 24),
    unit_price Nullable(Decimal(38, 24)),
    value Nullable(Decimal(38, 24)),
    amount Decimal(38, 24),
    ceiling_usd Nullable(Decimal(38, 24)),
    balance_after Nullable(Decimal(38, 24)),
    detected_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (user_id, record, id)
SETTINGS non_replicated_deduplication_window = 1000;
