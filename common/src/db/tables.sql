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
    row_id         text NOT NULL,
    old_path       text NOT NULL,
    new_path       text NOT NULL,
    rewritten_at   timestamptz NOT NULL DEFAULT now(),
    rolled_back_at timestamptz
);
CREATE INDEX IF NOT EXISTS avatar_migration_journal_at
    ON avatar_migration_journal USING brin (rewritten_at);
CREATE TABLE IF NOT EXISTS avatar_migration_verify (
    source_bucket text NOT NULL,
    source_prefix text NOT NULL,
    last_key      text,
    objects       bigint NOT NULL DEFAULT 0,
    missing_copy  bigint NOT NULL DEFAULT 0,
    conflicts     bigint NOT NULL DEFAULT 0,
    unproven      bigint NOT NULL DEFAULT 0,
    finished      boolean NOT NULL DEFAULT false,
    PRIMARY KEY (source_bucket, source_prefix)
);
CREATE TABLE IF NOT EXISTS avatar_migration_cleanup (
    source_bucket text NOT NULL,
    source_prefix text NOT NULL,
    last_key      text,
    objects       bigint NOT NULL DEFAULT 0,
    deleted       bigint NOT NULL DEFAULT 0,
    referenced    bigint NOT NULL DEFAULT 0,
    not_copied    bigint NOT NULL DEFAULT 0,
    failed        bigint NOT NULL DEFAULT 0,
    finished      boolean NOT NULL DEFAULT false,
    PRIMARY KEY (source_bucket, source_prefix)
);
CREATE TABLE IF NOT EXISTS avatar_migration_failures (
    subject     text NOT NULL,
    reason      text NOT NULL,
    detail      text NOT NULL,
    occurrences integer NOT NULL DEFAULT 1,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, reason)
);
