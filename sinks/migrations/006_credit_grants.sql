-- 006: prepaid credit bought, from the subscription records (DESIGN §5: "revenue comes from
-- plans: monthly price, overage, credits bought").
--
-- A subscription record lists the user's credit grants (append-only; the worker tops up the
-- wallet with each new one). The sink lands them as parallel arrays beside the plan schedule;
-- credit_grants has one row per grant. Credit revenue in the P&L stays credits DRAWN (the
-- revenue recognised when the credit pays for usage, see 005); what was bought and not yet
-- drawn is the outstanding wallet balance, a liability, not revenue.
ALTER TABLE ${db}.subscriptions
    ADD COLUMN IF NOT EXISTS credit_ids Array(String) AFTER effective_ats,
    ADD COLUMN IF NOT EXISTS credit_amounts Array(Decimal(38, 24)) AFTER credit_ids,
    ADD COLUMN IF NOT EXISTS credit_granted_ats Array(DateTime64(6, 'UTC')) AFTER credit_amounts;

CREATE VIEW IF NOT EXISTS ${db}.credit_grants AS
SELECT
    user_id,
    toString(org_id) AS org_id,
    credit_ids[i] AS credit_id,
    credit_amounts[i] AS amount,
    credit_granted_ats[i] AS granted_at
FROM ${db}.subscriptions FINAL
ARRAY JOIN arrayEnumerate(credit_ids) AS i;
