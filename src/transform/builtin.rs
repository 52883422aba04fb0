//! The rule sets that ship with Ferry, compiled into the binary from
//! `transforms/`.

/// (name, source) of every built-in rule set, in the order `ferry rules`
/// lists them.
static BUILTINS: &[(&str, &str)] = &[
    (
        "storage-class",
        include_str!("../../transforms/storage-class.rhai"),
    ),
    ("registry", include_str!("../../transforms/registry.rhai")),
    ("namespace", include_str!("../../transforms/namespace.rhai")),
    ("zones", include_str!("../../transforms/zones.rhai")),
    (
        "api-versions",
        include_str!("../../transforms/api-versions.rhai"),
    ),
    (
        "clone-for-test",
        include_str!("../../transforms/clone-for-test.rhai"),
    ),
];

/// (name, source) of every built-in rule set.
pub fn builtin_rule_sets() -> &'static [(&'static str, &'static str)] {
    BUILTINS
}

/// The source of a built-in rule set.
pub(crate) fn builtin(name: &str) -> Option<&'static str> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// Where a built-in's source lives in the repository, for diagnostics.
pub(crate) fn builtin_source_name(name: &str) -> String {
    format!("transforms/{name}.rhai")
}
