-- The migration's bookkeeping tables, created by `common::db::prepare` in every process (idempotent).
-- The fleet's control tables, the lease and the tombstones are with their modules.
CREATE TABLE IF NOT EXISTS avatar_migration_checkpoint (
    source_bucket text NOT NULL,
    source_prefix text NOT NULL,
    last_key      text,
    listed        bigint NOT NULL DEFAULT 0,
    pages         bigint NOT NULL DEFAULT 0,
    finished      boolean NOT NULL DEFAULT false,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    feeder_alive_until timestamptz,
    PRIMARY KEY (source_bucket, source_prefix)
);
CREATE TABLE IF NOT EXISTS avatar_migration_ranges (
    source_bucket text NOT NULL,
    source_prefix text NOT NULL,
    range_no      integer NOT NULL,
    after_key     text,
    until_key     text,
    inventory_file text,
    rows_done     bigint NOT NULL DEFAULT 0,
    last_key      text,
    listed        bigint NOT NULL DEFAULT 0,
    finished      boolean NOT NULL DEFAULT false,
    PRIMARY KEY (source_bucket, source_prefix, range_no)
);
CREATE TABLE IF NOT EXISTS avatar_migration_journal (
    journal_id     bigserial PRIMARY KEY,
    -- REFERENCES' column, as `schema.table.column` (NULL: `avatars.path`, by earlier versions).
    reference      text,
    row_id         text NOT NULL,
    old_path       text NOT NULL,
    new_path       text NOT NULL,
    -- The legacy object's key (NULL: `old_path`, a bare key).
    legacy_key     text,
    rewritten_at   timestamptz NOT NULL DEFAULT now(),
    rolled_back_at timestamptz
);
CREATE INDEX IF NOT EXISTS avatar_migration_journal_at
    ON avatar_migration_journal USING brin (rewritten_at);
-- Where the feeder's resumable scans of the source prefix stand (`verify --objects`, `cleanup`).
CREATE TABLE IF NOT EXISTS avatar_migration_scans (
    kind          text NOT NULL,
    source_bucket text NOT NULL,
    source_prefix text NOT NULL,
    last_key      text,
    counts        jsonb NOT NULL DEFAULT '{}',
    finished      boolean NOT NULL DEFAULT false,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, source_bucket, source_prefix)
);
-- An earlier version kept them in a table each: their positions are carried over once, so an
-- unfinished scan resumes where it stood, and the tables dropped.
DO $$
BEGIN
    IF to_regclass('avatar_migration_verify') IS NOT NULL THEN
        INSERT INTO avatar_migration_scans (kind, source_bucket, source_prefix, last_key, counts, finished)
        SELECT 'verify_objects', source_bucket, source_prefix, last_key,
               jsonb_build_object('objects', objects, 'missing_copy', missing_copy, 'conflicts', conflicts,
                                  'unproven', unproven),
               finished
        FROM avatar_migration_verify
        ON CONFLICT DO NOTHING;
        DROP TABLE avatar_migration_verify;
    END IF;
    IF to_regclass('avatar_migration_cleanup') IS NOT NULL THEN
        INSERT INTO avatar_migration_scans (kind, source_bucket, source_prefix, last_key, counts, finished)
        SELECT 'cleanup', source_bucket, source_prefix, last_key,
               jsonb_build_object('objects', objects, 'deleted', deleted, 'referenced', referenced,
                                  'not_copied', not_copied, 'failed', failed),
               finished
        FROM avatar_migration_cleanup
        ON CONFLICT DO NOTHING;
        DROP TABLE avatar_migration_cleanup;
    END IF;
END
$$;
CREATE TABLE IF NOT EXISTS avatar_migration_failures (
    subject     text NOT NULL,
    reason      text NOT NULL,
    detail      text NOT NULL,
    occurrences integer NOT NULL DEFAULT 1,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, reason)
);
