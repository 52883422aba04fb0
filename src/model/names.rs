//! The name rules of the API server, per kind: a name a namespace mapping or
//! a transform produces is checked here before anything is written, so a bad
//! name fails the preflight instead of half a restore. Also the rule for
//! names used as file names (`ferry transform -o dir`).

use serde_json::Value;

/// How the API server validates an object's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    /// Lowercase letters, digits and `-`, starting and ending with a letter
    /// or digit, at most 63 characters (namespaces, label-like names).
    Dns1123Label,
    /// Like a DNS label, starting with a letter (Services).
    Dns1035Label,
    /// Dot-separated DNS labels, at most 253 characters (most kinds).
    Dns1123Subdomain,
    /// Anything but `.`, `..` and names containing `/` or `%` (RBAC kinds).
    PathSegment,
}

impl NameRule {
    /// The rule for objects of `kind` in API group `group`.
    pub fn for_kind(group: &str, kind: &str) -> NameRule {
        match (group, kind) {
            ("", "Namespace") => NameRule::Dns1123Label,
            ("", "Service") => NameRule::Dns1035Label,
            (
                "rbac.authorization.k8s.io",
                "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding",
            ) => NameRule::PathSegment,
            _ => NameRule::Dns1123Subdomain,
        }
    }

    /// Why `name` breaks the rule, if it does.
    pub fn check(self, name: &str) -> Result<(), String> {
        if name.is_empty() {
            return Err("a name must not be empty".into());
        }
        match self {
            NameRule::Dns1123Label => dns_label(name, false),
            NameRule::Dns1035Label => dns_label(name, true),
            NameRule::Dns1123Subdomain => {
                if name.len() > 253 {
                    return Err(format!("{} characters is more than 253", name.len()));
                }
                name.split('.')
                    .try_for_each(|part| dns_label(part, false))
                    .map_err(|e| format!("{e} (it must be lowercase letters, digits, '-' and '.')"))
            }
            NameRule::PathSegment => {
                if name == "." || name == ".." {
                    Err(format!("'{name}' is not allowed"))
                } else if name.contains(['/', '%']) {
                    Err("it must not contain '/' or '%'".into())
                } else {
                    Ok(())
                }
            }
        }
    }
}

fn dns_label(label: &str, letter_first: bool) -> Result<(), String> {
    if label.is_empty() {
        return Err("it has an empty part".into());
    }
    if label.len() > 63 {
        return Err(format!("{} characters is more than 63", label.len()));
    }
    if let Some(bad) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "'{bad}' is not allowed (only lowercase letters, digits and '-')"
        ));
    }
    let first = label.chars().next().expect("not empty");
    let last = label.chars().last().expect("not empty");
    if letter_first && !first.is_ascii_lowercase() {
        return Err("it must start with a lowercase letter".into());
    }
    if first == '-' || last == '-' {
        return Err("it must start and end with a letter or digit".into());
    }
    Ok(())
}

/// Every problem with an object's name and namespace, each naming the
/// object, the value and the rule it breaks.
pub fn problems(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let group = object["apiVersion"]
        .as_str()
        .and_then(|v| v.rsplit_once('/').map(|(g, _)| g))
        .unwrap_or_default();
    let name = object.pointer("/metadata/name").and_then(Value::as_str);
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str);
    let shown = format!(
        "{kind}/{}{}",
        namespace.map(|n| format!("{n}/")).unwrap_or_default(),
        name.unwrap_or("")
    );
    let mut out = Vec::new();
    match name {
        None => out.push(format!("{shown}: it has no name")),
        Some(name) => {
            if let Err(why) = NameRule::for_kind(group, kind).check(name) {
                out.push(format!(
                    "{shown}: '{name}' is not a valid {kind} name: {why}"
                ));
            }
        }
    }
    if let Some(ns) = namespace
        && let Err(why) = NameRule::Dns1123Label.check(ns)
    {
        out.push(format!(
            "{shown}: '{ns}' is not a valid namespace name: {why}"
        ));
    }
    out
}

/// `part` as one file-name component: never empty, `.` or `..`, and
/// without path separators, so that a path built from it stays in its
/// directory.
pub fn file_component(part: &str) -> Result<&str, String> {
    if part.is_empty() || part == "." || part == ".." || part.contains(['/', '\\', '\0']) {
        return Err(format!(
            "'{part}' cannot be used as a file name (it would leave the output directory or name none)"
        ));
    }
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn namespaces_are_dns_labels() {
        let rule = NameRule::for_kind("", "Namespace");
        assert!(rule.check("shop-test").is_ok());
        assert!(rule.check("0shop").is_ok());
        for bad in ["Bad_2", "shop.test", "-shop", "shop-", &"a".repeat(64), ""] {
            assert!(rule.check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_kind_has_its_rule() {
        let service = NameRule::for_kind("", "Service");
        assert!(service.check("web").is_ok());
        assert!(
            service.check("1web").is_err(),
            "services start with a letter"
        );
        let configmap = NameRule::for_kind("", "ConfigMap");
        assert!(configmap.check("app.config-1").is_ok());
        assert!(configmap.check("App").is_err());
        assert!(configmap.check("a..b").is_err());
        let role = NameRule::for_kind("rbac.authorization.k8s.io", "ClusterRole");
        assert!(role.check("system:controller:x").is_ok());
        assert!(role.check("Bad_2").is_ok(), "RBAC names are path segments");
        assert!(role.check("../x").is_err());
        assert!(role.check("..").is_err());
    }

    #[test]
    fn problems_name_the_object_the_value_and_the_rule() {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": "Bad_2"}});
        let found = problems(&cm);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("ConfigMap/Bad_2/cfg: 'Bad_2' is not a valid namespace name"));
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "Bad_2"}});
        assert!(problems(&ns)[0].contains("not a valid Namespace name"));
        let crb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "reader-Bad_2"}});
        assert!(problems(&crb).is_empty());
        let ok = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop"}});
        assert!(problems(&ok).is_empty());
    }

    #[test]
    fn file_components_never_leave_their_directory() {
        assert_eq!(file_component("web").unwrap(), "web");
        for bad in ["..", ".", "", "../etc", "a/b", "a\\b"] {
            assert!(file_component(bad).is_err(), "{bad}");
        }
    }
}
