-- The database role the feeder and the consumers log in as, with only what they need.
-- Run as the owner of `avatars` (or a superuser), in the database that holds it, with psql:
--   psql "$ADMIN_URL" -v password='...' [-v connection_limit=N] -f deploy/database-role.sql
-- (the password is passed as a psql variable and quoted by psql itself; the grants name the
-- database psql is connected to). Stops at the first error; safe to run again.
-- Then store
--   postgres://avatar_migrator:<password>@<host>:5432/proddatabase?sslmode=verify-full&sslrootcert=/usr/share/avatar-migration/rds-global-bundle.pem
-- in the Secrets Manager secret the stack reads (DatabaseSecretArn): verify-full checks the
-- server's certificate and name against RDS's CA bundle, which the image holds (the binaries
-- trust no other CA for PostgreSQL; without sslrootcert they refuse RDS's certificate).
\set ON_ERROR_STOP on

-- The take-home's table, avatars: its index and grants below are made only where it exists. For
-- other tables (REFERENCES, docs/schemas.md), `feeder grants` prints the same for each column.
SELECT to_regclass('avatars') IS NOT NULL AS has_avatars \gset

\if :has_avatars
-- The index the compare-and-set rewrite needs, built online by the owner. Without it the binaries
-- stop at start-up and print this statement (MISSING_INDEX=refuse, their default).
-- An interrupted concurrent build leaves an INVALID index that `IF NOT EXISTS` would skip:
-- drop it first (\gexec runs the statement outside a transaction, as CONCURRENTLY needs), and
-- check at the end that the index is valid.
SELECT 'DROP INDEX CONCURRENTLY avatars_path_idx'
FROM pg_index WHERE indexrelid = to_regclass('avatars_path_idx') AND NOT indisvalid \gexec
CREATE INDEX CONCURRENTLY IF NOT EXISTS avatars_path_idx ON avatars (path);
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_index WHERE indexrelid = to_regclass('avatars_path_idx') AND indisvalid) THEN
        RAISE EXCEPTION 'index avatars_path_idx is not valid: run this script again';
    END IF;
END $$;

-- Planner statistics: without them (a table never analyzed, a database fresh from pg_restore
-- or pg_upgrade) each batched rewrite is planned as full scans. Only the owner may analyze;
-- it reads a sample and blocks neither reads nor writes.
ANALYZE avatars;
\endif

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'avatar_migrator') THEN
        CREATE ROLE avatar_migrator LOGIN;
    END IF;
END $$;
ALTER ROLE avatar_migrator PASSWORD :'password';
-- The migration's connection budget, enforced by the database itself: past it the role's new
-- connections are refused and the live service's are not. The fleet needs ConsumerMaxTasks x
-- DatabaseConnectionsPerConsumer + 4 (the feeder) + 4 per operator command running at once;
-- the default fits the stack's defaults (40 x 4 + 4 + 4 = 168). Choose it against what the
-- database can spare (max_connections minus the live service's pools and reserved slots).
\if :{?connection_limit}
\else
\set connection_limit 170
\endif
ALTER ROLE avatar_migrator CONNECTION LIMIT :connection_limit;

GRANT CONNECT ON DATABASE :"DBNAME" TO avatar_migrator;
-- The bookkeeping tables (avatar_migration_checkpoint, _ranges, _failures, _journal, _verify,
-- _cleanup, the fleet's _control and _consumers, the _leases, the _tombstones and the fence's
-- function and counter), which the role creates and owns.
GRANT USAGE, CREATE ON SCHEMA public TO avatar_migrator;
\if :has_avatars
-- verify and status read every row; the rewrite changes `path` only.
GRANT SELECT, UPDATE (path) ON avatars TO avatar_migrator;
-- The fence (`feeder fence install|remove`): a trigger on avatars that keeps deletes of legacy
-- objects safe while the live service writes; its function runs with this role's rights.
GRANT TRIGGER ON avatars TO avatar_migrator;
\endif
-- The delete protocol waits for the transactions open when its tombstones were committed, and
-- names them while it waits: pg_read_all_stats lets it see which are autovacuum (never waited
-- for) and how long each has been open. Without it, every transaction is waited for.
DO $$
BEGIN
    GRANT pg_read_all_stats TO avatar_migrator;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cannot grant pg_read_all_stats (ask a superuser): the delete protocol then also waits for autovacuum';
END $$;
