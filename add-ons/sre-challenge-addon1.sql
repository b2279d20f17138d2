-- The production schema the migration works on: database `proddatabase`, table `avatars`.
-- Run with psql as a superuser; safe to run twice.
SELECT 'CREATE DATABASE proddatabase'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'proddatabase')\gexec

\connect proddatabase

CREATE TABLE IF NOT EXISTS avatars (
    id SERIAL PRIMARY KEY,
    path VARCHAR
);
