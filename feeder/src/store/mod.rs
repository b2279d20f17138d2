//! The feeder's own bookkeeping in PostgreSQL, one file per table: the listing's ranges, the
//! rewrite journal, the scans' positions, and what the operator's commands read of `avatars`.
//! The tables are created by `common::db::prepare`, which every process runs.

pub mod journal;
pub mod ranges;
pub mod rows;
pub mod scans;
