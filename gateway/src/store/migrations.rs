//! The schema migrations, embedded in the binary.
//!
//! Built by hand rather than with `sqlx::migrate!`: that macro is the only reason to
//! enable sqlx's `macros` feature, whose proc-macro crate compiles sqlx's drivers and
//! the bundled SQLite a second time for the build host (BENCHMARKS.md, "Build time and
//! size"). The result is what the macro builds: same versions, descriptions and
//! checksums (SHA-384 of the file), so databases migrated by either agree. A test
//! checks that every file in `migrations/` is listed here.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};

macro_rules! embed {
    ($dir:literal: $($file:literal),+ $(,)?) => {
        &[$(($file, include_str!(concat!("../../../migrations/", $dir, "/", $file)))),+]
    };
}

pub const SQLITE: &[(&str, &str)] = embed!(
    "sqlite": "0001_init.sql",
    "0004_security.sql",
    "0005_webhooks.sql",
    "0006_inbox_in_insertion_order.sql",
    "0007_push_sending_index.sql",
);
pub const POSTGRES: &[(&str, &str)] = embed!(
    "postgres": "0001_init.sql",
    "0004_security.sql",
    "0005_webhooks.sql",
    "0006_push_always.sql",
    "0007_push_sending_index.sql",
);

/// A migrator over `files` (`NNNN_description.sql`, in version order).
pub fn migrator(files: &[(&'static str, &'static str)]) -> Migrator {
    let migrations = files
        .iter()
        .map(|(name, sql)| {
            let stem = name.strip_suffix(".sql").expect("a .sql file");
            let (version, description) = stem.split_once('_').expect("NNNN_description.sql");
            Migration::new(
                version.parse().expect("a numeric version"),
                Cow::Owned(description.replace('_', " ")),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect::<Vec<_>>();
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_file_is_embedded_in_order() {
        for (dir, embedded) in [("sqlite", SQLITE), ("postgres", POSTGRES)] {
            let path = format!("{}/../migrations/{dir}", env!("CARGO_MANIFEST_DIR"));
            let mut on_disk: Vec<String> = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".sql"))
                .collect();
            on_disk.sort();
            let listed: Vec<String> = embedded.iter().map(|(n, _)| n.to_string()).collect();
            assert_eq!(
                listed, on_disk,
                "migrations/{dir}: list every file in SQLITE/POSTGRES"
            );
            let versions: Vec<i64> = migrator(embedded).iter().map(|m| m.version).collect();
            assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        }
    }
}
