-- The database role the feeder and the consumers log in as, with only what they need.
-- Run as the owner of `avatars` (or a superuser), in database proddatabase, with psql:
--   psql "$ADMIN_URL" -v password="'...'" -f deploy/database-role.sql
-- Then store postgres://avatar_migrator:<password>@<host>:5432/proddatabase in the Secrets
-- Manager secret the stack reads (DatabaseSecretArn).

-- The index the compare-and-set rewrite needs, built online by the owner. The binaries build it
-- themselves only when they own the table; logged in as this role they find it and go on
-- (without it they stop at start-up with an error naming the index).
CREATE INDEX CONCURRENTLY IF NOT EXISTS avatars_path_idx ON avatars (path);

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'avatar_migrator') THEN
        CREATE ROLE avatar_migrator LOGIN;
    END IF;
END $$;
ALTER ROLE avatar_migrator PASSWORD :password;

GRANT CONNECT ON DATABASE proddatabase TO avatar_migrator;
-- The bookkeeping tables (avatar_migration_checkpoint, avatar_migration_failures).
GRANT USAGE, CREATE ON SCHEMA public TO avatar_migrator;
-- verify and status read every row; the rewrite changes `path` only.
GRANT SELECT, UPDATE (path) ON avatars TO avatar_migrator;
