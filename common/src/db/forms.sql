-- A URL's percent-encoding in SQL, as `common::references::Form` writes and reads it in Rust, for
-- the statements that meet values rather than keys (status's counts, the fence's trigger).
-- Created by `common::db::prepare` in every process (idempotent).

-- Every byte of the UTF-8 text but ASCII letters, digits and `-._~/`, as %XX (upper case).
CREATE OR REPLACE FUNCTION avatar_migration_url_encode(value text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT coalesce(string_agg(
               CASE WHEN ascii(c) BETWEEN 48 AND 57 OR ascii(c) BETWEEN 65 AND 90
                         OR ascii(c) BETWEEN 97 AND 122 OR c IN ('-', '.', '_', '~', '/')
                    THEN c
                    ELSE upper(regexp_replace(encode(convert_to(c, 'UTF8'), 'hex'), '(..)', '%\1', 'g'))
               END, '' ORDER BY n), '')
    FROM regexp_split_to_table(value, '') WITH ORDINALITY AS t(c, n)
$$;

-- The text a percent-encoded value stands for, whichever characters it encoded; NULL when it is
-- not one (a '%' without two hex digits, bytes that are not UTF-8).
CREATE OR REPLACE FUNCTION avatar_migration_url_decode(value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    IF value ~ '%($|.$|[^0-9A-Fa-f]|.[^0-9A-Fa-f])' THEN
        RETURN NULL;
    END IF;
    IF position('%' IN value) = 0 THEN
        RETURN value;
    END IF;
    RETURN (SELECT convert_from(string_agg(
                       CASE WHEN m[1] IS NOT NULL THEN decode(substr(m[1], 2), 'hex')
                            ELSE convert_to(m[2], 'UTF8') END,
                       ''::bytea ORDER BY n), 'UTF8')
            FROM regexp_matches(value, '(%[0-9A-Fa-f]{2})|([^%]+)', 'g') WITH ORDINALITY AS t(m, n));
EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
    RETURN NULL;
END
$$;
