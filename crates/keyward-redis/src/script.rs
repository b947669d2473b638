//! The Lua scripts: every script is one file under `scripts/` (plus the shared parts it
//! needs), and every script opens with a Redis 7 shebang that declares what it does, so
//! that Redis checks it before running it:
//!
//! - `writes` (`#!lua`, no flags): it may write. A replica, even one whose connection
//!   sent `READONLY` (the cluster client sends it to every node), answers `MOVED` to its
//!   primary instead of running it and failing halfway with `READONLY`; on an out-of-memory
//!   primary it is refused before it starts.
//! - `deletes` (`#!lua flags=allow-oom`): it only deletes and publishes (releases,
//!   abandons), so it may run on an out-of-memory primary and free memory there.
//! - `reads` (`#!lua flags=no-writes`): it only reads.
//!
//! The shebang needs Redis 7 (or Valkey 7.2) or later.

/// A `LazyLock<Script>` made of the shebang for `$nature` and the concatenated files.
macro_rules! script {
    (@flags writes) => { "#!lua\n" };
    (@flags deletes) => { "#!lua flags=allow-oom\n" };
    (@flags reads) => { "#!lua flags=no-writes\n" };
    ($nature:ident: $($file:literal),+ $(,)?) => {
        std::sync::LazyLock::new(|| {
            redis::Script::new(concat!(
                $crate::script::script!(@flags $nature),
                $(include_str!(concat!("scripts/", $file))),+
            ))
        })
    };
}

pub(crate) use script;

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use redis::Script;

    static SAMPLE: LazyLock<Script> = script!(reads: "watch.lua");

    #[test]
    fn scripts_open_with_their_flags() {
        // The hash is of the whole text, shebang included: what Redis sees.
        let expected = Script::new(concat!(
            "#!lua flags=no-writes\n",
            include_str!("scripts/watch.lua")
        ));
        assert_eq!(SAMPLE.get_hash(), expected.get_hash());
    }
}
