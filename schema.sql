-- neoq_anyio schema: the one source of the database schema.
--
-- It is Go neoq's schema (backends/postgres/migrations, up to version
-- 20240302172413) written so that it can run on an empty schema, on a schema
-- Go neoq migrated, or on one this file already created: every statement is
-- idempotent and changes are only additive. neoq_anyio runs it inside one
-- transaction holding an advisory lock (see neoq_anyio/_schema.py), and only
-- when neoq_anyio_migrations lacks its version, so concurrent startups
-- migrate once.
--
-- Objects are created in the first schema of the session's search_path, so
-- a DSN with options=-csearch_path=NAME gets a schema of its own.

DO $$ BEGIN
    CREATE TYPE job_status AS ENUM ('new', 'processed', 'failed');
EXCEPTION
    WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS neoq_dead_jobs (
    id SERIAL NOT NULL,
    fingerprint text NOT NULL,
    queue text NOT NULL,
    status job_status NOT NULL DEFAULT 'failed',
    payload jsonb,
    retries integer,
    max_retries integer,
    created_at timestamp with time zone DEFAULT now(),
    error text
);

CREATE TABLE IF NOT EXISTS neoq_jobs (
    id SERIAL NOT NULL,
    fingerprint text NOT NULL,
    queue text NOT NULL,
    status job_status NOT NULL DEFAULT 'new',
    payload jsonb,
    retries integer DEFAULT 0,
    max_retries integer DEFAULT 23,
    run_after timestamp with time zone DEFAULT now(),
    ran_at timestamp with time zone,
    created_at timestamp with time zone DEFAULT now(),
    error text
);

CREATE INDEX IF NOT EXISTS neoq_job_fetcher_idx ON neoq_jobs (id, status, run_after);
CREATE INDEX IF NOT EXISTS neoq_jobs_fetcher_idx ON neoq_jobs (queue, status, run_after);

-- 20230827174530_add_deadline_field_to_jobs
ALTER TABLE neoq_jobs ADD COLUMN IF NOT EXISTS deadline timestamp with time zone;
ALTER TABLE neoq_dead_jobs ADD COLUMN IF NOT EXISTS deadline timestamp with time zone;

-- 20230902105301 and 20240302172413: at most one unprocessed job per queue,
-- fingerprint and status. Go's older (fingerprint, status) index is replaced.
-- (The index is looked up by name, not through pg_indexes, which would
-- describe every index of the database, even ones being dropped meanwhile.)
DO $$
DECLARE
    old_index regclass := to_regclass(
        quote_ident(current_schema()) || '.neoq_jobs_fingerprint_unique_idx');
BEGIN
    IF old_index IS NOT NULL
       AND pg_get_indexdef(old_index) NOT LIKE '%(queue, fingerprint, status)%' THEN
        DROP INDEX neoq_jobs_fingerprint_unique_idx;
    END IF;
END $$;
DROP INDEX IF EXISTS neoq_jobs_fingerprint_idx;
CREATE UNIQUE INDEX IF NOT EXISTS neoq_jobs_fingerprint_unique_idx
    ON neoq_jobs (queue, fingerprint, status) WHERE NOT (status = 'processed');

-- 20230928141356_create-new-job-trigger: announce due jobs on the channel
-- named after their queue, with the job id as payload.
CREATE OR REPLACE FUNCTION announce_job() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify(CAST(NEW.queue AS text), CAST(NEW.id AS text));
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DO $$ BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgname = 'announce_job' AND tgrelid = 'neoq_jobs'::regclass
    ) THEN
        CREATE TRIGGER announce_job
            AFTER INSERT ON neoq_jobs FOR EACH ROW
            WHEN (NEW.run_after <= timezone('utc', NEW.created_at))
            EXECUTE PROCEDURE announce_job();
    END IF;
END $$;

-- 20231005160721_make-job-id-bigint
DO $$ BEGIN
    IF (SELECT data_type FROM information_schema.columns
        WHERE table_schema = current_schema()
          AND table_name = 'neoq_jobs' AND column_name = 'id') <> 'bigint' THEN
        ALTER TABLE neoq_jobs ALTER COLUMN id SET DATA TYPE bigint;
        ALTER SEQUENCE neoq_jobs_id_seq AS bigint;
    END IF;
END $$;

-- Go neoq's golang-migrate bookkeeping: with this row a Go neoq service
-- sees the schema as current and migrates nothing.
CREATE TABLE IF NOT EXISTS neoq_schema_migrations (
    version bigint NOT NULL PRIMARY KEY,
    dirty boolean NOT NULL
);
INSERT INTO neoq_schema_migrations (version, dirty)
SELECT 20240302172413, false
WHERE NOT EXISTS (SELECT 1 FROM neoq_schema_migrations);

-- neoq_anyio additions (additive only; Go neoq ignores them).

-- (Version 1 indexed due jobs in neoq_anyio_jobs_due_idx; version 5
-- replaces it with neoq_anyio_jobs_ready_idx below.)

-- neoq_jobs.id became bigint in Go neoq, but neoq_dead_jobs.id stayed an
-- integer, so burying a job with an id past 2^31 would fail. Widening is
-- compatible with Go neoq's inserts.
DO $$ BEGIN
    IF (SELECT data_type FROM information_schema.columns
        WHERE table_schema = current_schema()
          AND table_name = 'neoq_dead_jobs' AND column_name = 'id') <> 'bigint' THEN
        ALTER TABLE neoq_dead_jobs ALTER COLUMN id SET DATA TYPE bigint;
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS neoq_anyio_migrations (
    version integer NOT NULL PRIMARY KEY,
    applied_at timestamp with time zone NOT NULL DEFAULT now()
);

-- Cron ticks claimed so far: one row per (queue, tick) lets exactly one
-- process enqueue each tick's job (see neoq_anyio/_cron.py). Old rows are
-- pruned as new ticks are claimed.
CREATE TABLE IF NOT EXISTS neoq_anyio_cron_ticks (
    queue text NOT NULL,
    tick timestamp with time zone NOT NULL,
    PRIMARY KEY (queue, tick)
);

-- Version 3: dead jobs are looked up by id (get_job, retry_job) and pruned
-- by the time they died; Go neoq's table has no index at all.
CREATE INDEX IF NOT EXISTS neoq_anyio_dead_jobs_id_idx ON neoq_dead_jobs (id);
CREATE INDEX IF NOT EXISTS neoq_anyio_dead_jobs_created_at_idx ON neoq_dead_jobs (created_at);

-- Version 4: the trace context (W3C traceparent, ...) of the request that
-- enqueued a job, written only when tracing is on (neoq_anyio/_tracing.py),
-- so the job's span continues that trace. Nullable: Go neoq's INSERTs,
-- which do not name it, leave it NULL.
ALTER TABLE neoq_jobs ADD COLUMN IF NOT EXISTS trace_context jsonb;

-- Version 5: lease mode (neoq_anyio/_postgres/_leases.py). A leased job keeps
-- its status (new or failed, so deduplication is as in transaction mode) and
-- carries a lease: its fencing token (the claiming transaction's id) and when
-- the lease expires. Every write of the lease holder matches the token.
ALTER TABLE neoq_jobs ADD COLUMN IF NOT EXISTS lease_token bigint;
ALTER TABLE neoq_jobs ADD COLUMN IF NOT EXISTS lease_expires_at timestamp with time zone;

-- Jobs ready to be claimed, by queue, in claim order: unprocessed and not
-- leased. Keeping processed and leased rows out keeps claims flat as
-- history grows; claims start from where the last one ended (a keyset
-- "watermark"), so the dead entries completed jobs leave at the head of this
-- index are not walked again (neoq_anyio/_postgres/_watermark.py).
--
-- Among a queue's due jobs, higher priority first (Job(priority=...), a
-- smallint, 0 by default; Go neoq's INSERTs leave it 0): the index keys on
-- the priority negated, so one ascending scan runs in claim order.
ALTER TABLE neoq_jobs ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0;
ALTER TABLE neoq_dead_jobs ADD COLUMN IF NOT EXISTS priority smallint;
CREATE INDEX IF NOT EXISTS neoq_anyio_jobs_ready_idx
    ON neoq_jobs (queue, (-priority::integer), run_after, id)
    WHERE status <> 'processed' AND lease_token IS NULL;
DROP INDEX IF EXISTS neoq_anyio_jobs_due_idx;

-- Leases by expiry, to find those whose worker was lost.
CREATE INDEX IF NOT EXISTS neoq_anyio_jobs_lease_idx
    ON neoq_jobs (queue, lease_expires_at) WHERE lease_token IS NOT NULL;

-- Paused queues (pause_queue, resume_queue; neoq_anyio/_postgres/_pauses.py):
-- no process takes jobs from a queue whose row says paused. A change is
-- announced on the channel neoq_anyio_queues_v1, and every process re-reads
-- the paused rows every job_check_interval besides. Go neoq ignores it.
CREATE TABLE IF NOT EXISTS neoq_anyio_queues (
    queue text PRIMARY KEY,
    paused boolean NOT NULL DEFAULT false,
    changed_at timestamp with time zone NOT NULL DEFAULT now()
);

-- Global limits of lease-mode queues (Handler(global_concurrency=N,
-- rate_limit=(n, seconds)); neoq_anyio/_postgres/_limits.py). A slot row is
-- busy until expires_at, which follows its job's lease: heartbeats extend
-- both, the job's end frees the slot, and a lost worker's slot expires with
-- its lease.
CREATE TABLE IF NOT EXISTS neoq_anyio_slots (
    queue text NOT NULL,
    slot integer NOT NULL,
    job_id bigint,
    lease_token bigint,
    expires_at timestamp with time zone,
    PRIMARY KEY (queue, slot)
);
-- Job starts per fixed window of a rate-limited queue: the window's number
-- (seconds since the epoch, divided by the window's length) and its starts.
CREATE TABLE IF NOT EXISTS neoq_anyio_rates (
    queue text PRIMARY KEY,
    window_no bigint NOT NULL DEFAULT 0,
    started integer NOT NULL DEFAULT 0
);
