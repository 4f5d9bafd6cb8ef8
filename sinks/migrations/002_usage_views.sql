-- 002: hour and day usage per plan (tier) and served model, fed from the RAW priced events.
--
-- Why plain VIEWs over `priced_events FINAL`: every event lands in priced_events once after
-- ReplacingMergeTree dedup, and FINAL applies that dedup at read time, so these views can never
-- count an event twice, whatever the sink replays. A materialized view (SummingMergeTree) fed
-- by inserts would count a replayed event again whenever its batch differs from the first one
-- (insert dedup tokens only catch identical batches), and views over `rollups` would count
-- re-emitted windows. If these become too slow at scale, the drop-in replacement is a
-- refreshable materialized view (REFRESH EVERY ...) over the same FINAL query: it recomputes,
-- so it cannot double count either. Never feed them from rollups.
CREATE VIEW IF NOT EXISTS ${db}.usage_hourly AS
SELECT
    toStartOfHour(occurred_at) AS hour,
    plan_id,
    served_model,
    count() AS requests,
    uniqExact(user_id) AS users,
    sum(input_tokens) AS input_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(output_tokens) AS output_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    countIf(semantic_cache_hit) AS semantic_cache_hits,
    sum(cost) AS cost,
    sum(list_value) AS list_value,
    sum(saved_prompt_cache) AS saved_prompt_cache,
    sum(saved_semantic_cache) AS saved_semantic_cache,
    sum(saved_routing) AS saved_routing
FROM ${db}.priced_events FINAL
GROUP BY hour, plan_id, served_model;

CREATE VIEW IF NOT EXISTS ${db}.usage_daily AS
SELECT
    toDate(occurred_at) AS day,
    plan_id,
    served_model,
    count() AS requests,
    uniqExact(user_id) AS users,
    sum(input_tokens) AS input_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(output_tokens) AS output_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    countIf(semantic_cache_hit) AS semantic_cache_hits,
    sum(cost) AS cost,
    sum(list_value) AS list_value,
    sum(saved_prompt_cache) AS saved_prompt_cache,
    sum(saved_semantic_cache) AS saved_semantic_cache,
    sum(saved_routing) AS saved_routing
FROM ${db}.priced_events FINAL
GROUP BY day, plan_id, served_model;
