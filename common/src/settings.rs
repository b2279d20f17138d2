//! Settings both binaries share, parsed once at start. Every setting is a flag and an
//! environment variable of the same name (clap's `env`); `.env` files load through dotenvy
//! before parsing. Values that are secrets (the database URL) are held in `SecretString`,
//! hidden from `--help` and never printed, not even in error messages.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;

use crate::db::{MissingIndex, Schema};
use crate::keys::{KeyMapping, Prefix};
use crate::references::References;

/// Loads `.env` from the working directory when there is one. A malformed `.env` is an error
/// naming the file and line; a missing one is not.
pub fn load_dotenv() -> anyhow::Result<()> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(err) if err.not_found() => Ok(()),
        Err(err) => Err(anyhow::anyhow!("cannot read .env: {err}: fix or remove the file")),
    }
}

/// Where objects move from and to.
#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
    /// The legacy bucket objects are moved from. Required. Only read, unless legacy objects are
    /// deleted once safely moved (`feeder cleanup --yes`, the consumer's `DELETE_SOURCE`).
    #[arg(long, env = "SOURCE_BUCKET_NAME")]
    pub source_bucket_name: String,

    /// The production bucket objects are copied into. Required. Objects already there are never
    /// overwritten.
    #[arg(long, env = "DESTINATION_BUCKET_NAME")]
    pub destination_bucket_name: String,

    /// Key prefix moved from, matched exactly and case-sensitively (`Image/` and `imagex/` are
    /// not under `image/`). Rows whose path starts with it are rewritten.
    #[arg(long, env = "SOURCE_PREFIX", default_value = "image/")]
    pub source_prefix: Prefix,

    /// Key prefix moved to: SOURCE_PREFIX + rest becomes DESTINATION_PREFIX + rest.
    #[arg(long, env = "DESTINATION_PREFIX", default_value = "avatar/")]
    pub destination_prefix: Prefix,

    /// Path-style S3 addressing (`endpoint/bucket/key`), needed by local emulators; `false`
    /// (virtual-hosted style) on AWS.
    #[arg(long, env = "S3_FORCE_PATH_STYLE", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub s3_force_path_style: bool,

    /// Longest wait for S3's whole answer to one attempt of a request (a HEAD, a listing, a
    /// delete, a copy), plus, for a copy, one second per 25 MiB of the object (S3 copies far
    /// faster); past it the attempt is abandoned and tried again (up to the SDK's attempts), so
    /// that a server that takes a request and never answers holds nothing for long. The
    /// connection itself must be made within 3.1 s.
    #[arg(long, env = "S3_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub s3_request_timeout: std::time::Duration,
}

impl StorageArgs {
    pub fn mapping(&self) -> anyhow::Result<KeyMapping> {
        for (name, value) in [
            ("SOURCE_BUCKET_NAME", &self.source_bucket_name),
            ("DESTINATION_BUCKET_NAME", &self.destination_bucket_name),
        ] {
            check_bucket_name(value).with_context(|| format!("{name} is not a valid bucket name"))?;
        }
        KeyMapping::new(
            self.source_bucket_name.clone(),
            self.source_prefix.clone(),
            self.destination_bucket_name.clone(),
            self.destination_prefix.clone(),
        )
        .map_err(anyhow::Error::from)
    }
}

fn check_bucket_name(name: &str) -> anyhow::Result<()> {
    let ok = (3..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    anyhow::ensure!(ok, "{name:?}: 3 to 63 lowercase letters, digits, '-' or '.'");
    Ok(())
}

/// The SQS queue.
#[derive(Args, Debug, Clone)]
pub struct QueueArgs {
    /// URL of the SQS standard queue carrying one message per object
    /// (https://sqs.<region>.amazonaws.com/<account>/<name>). Required. Give it a dead-letter
    /// queue (redrive policy) so that messages failing repeatedly end somewhere visible.
    #[arg(long, env = "QUEUE_URL", value_parser = parse_queue_url)]
    pub queue_url: String,
}

fn parse_queue_url(s: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        (s.starts_with("https://") || s.starts_with("http://")) && s.len() > 8,
        "QUEUE_URL must be the queue's http(s) URL, as `aws sqs get-queue-url` prints it"
    );
    Ok(s.to_owned())
}

/// The PostgreSQL database holding the references.
#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL connection string, e.g. postgres://user:password@host:5432/proddatabase.
    /// Required. A secret: never printed.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub database_url: SecretString,

    /// Longest wait for a lock in any statement of the migration (PostgreSQL `lock_timeout`),
    /// e.g. `200ms`, `1s`. Rows the live service holds are skipped, not waited for; this bounds
    /// every other wait, so a production write never queues behind the migration for longer.
    /// A statement that hits it is retried later. Index preparation is exempt.
    #[arg(long, env = "DB_LOCK_TIMEOUT", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub db_lock_timeout: Duration,

    /// Longest run of any statement of the migration (PostgreSQL `statement_timeout`), e.g.
    /// `30s`. A statement cut short is retried later. Index preparation and the operator's full
    /// counts (`feeder status`) are exempt.
    #[arg(long, env = "DB_STATEMENT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub db_statement_timeout: Duration,

    /// The columns whose values name the moved objects, comma-separated or the flag repeated:
    /// `[schema.]table.column[=FORM]`, e.g. `public.users.avatar_url=https://cdn.example.com/{key},posts.cover_key`.
    /// Names fold to lower case unless double-quoted (`"Users"."Avatar URL"`). FORM is how a
    /// value names an object: `key` (the default: the key itself, `image/a.png`), `s3`
    /// (`s3://{bucket}/{key}`), or a template holding `{key}` once and `{bucket}` at most once
    /// (the source bucket in legacy values, the destination bucket in new ones); in a template
    /// starting with `http://` or `https://` the key is percent-encoded as URLs carry it. Each
    /// table needs a primary key of one column (of any type) and an index on the column (see
    /// MISSING_INDEX). Values of another form, NULLs and keys outside SOURCE_PREFIX are left
    /// alone.
    #[arg(long = "references", env = "REFERENCES", default_value = "avatars.path", action = clap::ArgAction::Append)]
    pub references: Vec<References>,

    /// What start-up does when a referencing column has no index serving lookups by value
    /// (each lookup would scan the whole table): `refuse` stops and prints the `CREATE INDEX
    /// CONCURRENTLY` to run; `build` builds it (concurrently: the table's reads and writes go
    /// on; only the table's owner may); `scan` goes on without (small tables only).
    #[arg(long, env = "MISSING_INDEX", value_enum, default_value_t = MissingIndex::Refuse)]
    pub missing_index: MissingIndex,
}

/// A setting that is a secret: kept out of `Debug` and logs.
pub(crate) fn parse_secret(s: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(s.to_owned()))
}

impl DatabaseArgs {
    /// The references (every flag or list given, each column once) and the index policy.
    pub fn schema(&self) -> anyhow::Result<Schema> {
        let all = self.references.iter().flat_map(References::iter).cloned().collect();
        let references = References::new(all).map_err(anyhow::Error::msg)?;
        Ok(Schema { references, missing_index: self.missing_index })
    }

    /// Parses the connection string without ever echoing it (it may hold a password).
    pub fn connect_options(&self) -> anyhow::Result<PgConnectOptions> {
        let url = self.database_url.expose_secret();
        anyhow::ensure!(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "DATABASE_URL must be a PostgreSQL connection string: postgres://user:password@host:port/database"
        );
        let options = PgConnectOptions::from_str(url).map_err(|_| {
            anyhow::anyhow!(
                "DATABASE_URL is not a valid PostgreSQL connection string: expected \
                 postgres://user:password@host:port/database"
            )
        })?;
        Ok(options.options([
            ("lock_timeout", millis(self.db_lock_timeout)),
            ("statement_timeout", millis(self.db_statement_timeout)),
        ]))
    }
}

/// A duration setting: humantime's forms (`30s`, `5m`, `250ms`, `1h 30m`), or a bare number of
/// seconds (as settings whose name says `_SECONDS`, and earlier versions, take them).
pub fn duration_secs(s: &str) -> anyhow::Result<Duration> {
    duration(s, Duration::from_secs)
}

/// A duration setting: humantime's forms, or a bare number of milliseconds (settings whose
/// name says `_MS`).
pub fn duration_millis(s: &str) -> anyhow::Result<Duration> {
    duration(s, Duration::from_millis)
}

fn duration(s: &str, bare: fn(u64) -> Duration) -> anyhow::Result<Duration> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(bare(n));
    }
    humantime::parse_duration(s)
        .map_err(|e| anyhow::anyhow!("{s:?} is not a duration ({e}): write it as e.g. 30s, 5m, 250ms or 1h"))
}

/// A duration in whole seconds within `min..=max`, as SQS takes them.
pub fn whole_seconds(d: Duration, min: u64, max: u64) -> anyhow::Result<Duration> {
    anyhow::ensure!(d.subsec_nanos() == 0, "{} is not a whole number of seconds", humantime::format_duration(d));
    anyhow::ensure!(
        (min..=max).contains(&d.as_secs()),
        "{} is outside {}..={}",
        humantime::format_duration(d),
        humantime::format_duration(Duration::from_secs(min)),
        humantime::format_duration(Duration::from_secs(max))
    );
    Ok(d)
}

/// A duration as PostgreSQL reads it, in milliseconds (0 would mean no limit: at least 1 ms).
fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        assert!(check_bucket_name("legacy-s3").is_ok());
        assert!(check_bucket_name("a.b-c1").is_ok());
        assert!(check_bucket_name("Legacy").is_err());
        assert!(check_bucket_name("ab").is_err());
        assert!(check_bucket_name("-ab").is_err());
        assert!(check_bucket_name("a b c").is_err());
    }

    fn database_args(url: &str) -> DatabaseArgs {
        DatabaseArgs {
            database_url: SecretString::from(url),
            db_lock_timeout: Duration::from_millis(200),
            db_statement_timeout: Duration::from_secs(30),
            references: vec![References::default()],
            missing_index: MissingIndex::Refuse,
        }
    }

    #[test]
    fn database_url_errors_never_echo_the_secret() {
        for url in ["mysql://u:hunter2@h/db", "postgres://u:hunter2@h:notaport/db", "hunter2"] {
            let args = database_args(url);
            let err = format!("{:#}", args.connect_options().unwrap_err());
            assert!(err.contains("DATABASE_URL") && !err.contains("hunter2"), "{err}");
        }
        let args = database_args("postgres://u:hunter2@h:5432/db");
        assert!(args.connect_options().is_ok());
        assert!(format!("{args:?}").contains("REDACTED") || !format!("{args:?}").contains("hunter2"));
    }

    #[test]
    fn durations_read_humantime_or_a_bare_number_in_the_settings_unit() {
        assert_eq!(duration_secs("25").unwrap(), Duration::from_secs(25));
        assert_eq!(duration_secs("25s").unwrap(), Duration::from_secs(25));
        assert_eq!(duration_secs(" 5m ").unwrap(), Duration::from_secs(300));
        assert_eq!(duration_secs("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(duration_millis("250").unwrap(), Duration::from_millis(250));
        assert_eq!(duration_millis("1s").unwrap(), Duration::from_secs(1));
        for bad in ["", "-1", "ten", "5 parsecs", "1.5"] {
            let err = duration_secs(bad).unwrap_err().to_string();
            assert!(err.contains("is not a duration") && err.contains("30s"), "{bad:?}: {err}");
        }
        assert!(whole_seconds(Duration::from_secs(60), 1, 43_200).is_ok());
        assert!(whole_seconds(Duration::from_millis(1500), 1, 43_200).unwrap_err().to_string().contains("whole"));
        assert!(whole_seconds(Duration::ZERO, 1, 43_200).unwrap_err().to_string().contains("outside"));
        assert!(whole_seconds(Duration::from_secs(21), 0, 20).is_err());
    }

    #[test]
    fn queue_url_must_be_a_url() {
        assert!(parse_queue_url("http://127.0.0.1:4566/000000000000/q").is_ok());
        assert!(parse_queue_url("my-queue").is_err());
    }
}
