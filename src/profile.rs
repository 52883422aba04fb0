//! The cluster profile: what a cluster is and offers, in a form that can be
//! saved to a file, stored in every snapshot, and consulted offline by
//! transforms and restore validation.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterProfile {
    /// `gitVersion` of the API server, e.g. `v1.37.2`.
    pub version: String,
    pub major: u32,
    pub minor: u32,
    /// Best guess of the distribution from version strings and node labels
    /// (`eks`, `gke`, `aks`, `openshift`, `k3s`, or `kubernetes`).
    pub distribution: String,
    /// Every served groupVersion, e.g. `apps/v1`, `batch/v1beta1`.
    pub served_group_versions: BTreeSet<String>,
    /// Served kinds as `group/version/Kind` (core kinds as `v1/Kind`).
    pub served_kinds: BTreeSet<String>,
    pub storage_classes: Vec<StorageClassInfo>,
    pub ingress_classes: Vec<IngressClassInfo>,
    pub priority_classes: Vec<String>,
    pub runtime_classes: Vec<String>,
    pub zones: BTreeSet<String>,
    pub regions: BTreeSet<String>,
    /// What could not be read (forbidden or failing), so a reader knows
    /// which parts of the profile are incomplete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incomplete: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageClassInfo {
    pub name: String,
    pub provisioner: String,
    pub default: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_binding_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_volume_expansion: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressClassInfo {
    pub name: String,
    pub controller: String,
    pub default: bool,
}

impl ClusterProfile {
    pub fn serves(&self, api_version: &str) -> bool {
        self.served_group_versions.contains(api_version)
    }

    pub fn serves_kind(&self, api_version: &str, kind: &str) -> bool {
        self.served_kinds.contains(&format!("{api_version}/{kind}"))
    }

    pub fn storage_class(&self, name: &str) -> Option<&StorageClassInfo> {
        self.storage_classes.iter().find(|s| s.name == name)
    }

    /// Whether the cluster had the class `kind`/`name` (StorageClass,
    /// IngressClass, PriorityClass or RuntimeClass); `None` when the profile
    /// does not know: another kind, or a list it could not read.
    pub fn has_class(&self, kind: &str, name: &str) -> Option<bool> {
        let (names, list): (Vec<&str>, &str) = match kind {
            "StorageClass" => (
                self.storage_classes
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect(),
                "storage classes",
            ),
            "IngressClass" => (
                self.ingress_classes
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect(),
                "ingress classes",
            ),
            "PriorityClass" => (
                self.priority_classes.iter().map(String::as_str).collect(),
                "priority classes",
            ),
            "RuntimeClass" => (
                self.runtime_classes.iter().map(String::as_str).collect(),
                "runtime classes",
            ),
            _ => return None,
        };
        if names.contains(&name) {
            return Some(true);
        }
        let unread = self.incomplete.iter().any(|i| i.starts_with(list)) || self.version.is_empty();
        (!unread).then_some(false)
    }
}

/// Parses the minor version out of `gitVersion`/`minor` strings such as
/// `"37"`, `"37+"` (EKS, GKE) or `v1.37.2-eks-1234`.
pub fn parse_minor(minor: &str, git_version: &str) -> u32 {
    let digits: String = minor.chars().take_while(|c| c.is_ascii_digit()).collect();
    if let Ok(m) = digits.parse() {
        return m;
    }
    git_version
        .trim_start_matches('v')
        .split('.')
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// Distribution hints visible to any client: version suffixes and node labels.
pub fn guess_distribution(git_version: &str, node_label_keys: &BTreeSet<String>) -> String {
    let v = git_version.to_ascii_lowercase();
    let has = |prefix: &str| node_label_keys.iter().any(|k| k.starts_with(prefix));
    if v.contains("-eks-") || has("eks.amazonaws.com/") {
        "eks"
    } else if v.contains("-gke.") || has("cloud.google.com/gke") {
        "gke"
    } else if has("kubernetes.azure.com/") {
        "aks"
    } else if has("node.openshift.io/") {
        "openshift"
    } else if v.contains("+k3s") {
        "k3s"
    } else {
        "kubernetes"
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_lookups_know_when_the_profile_cannot_tell() {
        let mut p = ClusterProfile {
            version: "v1.37.2".into(),
            ingress_classes: vec![IngressClassInfo {
                name: "nginx".into(),
                ..Default::default()
            }],
            priority_classes: vec!["high".into()],
            ..Default::default()
        };
        assert_eq!(p.has_class("IngressClass", "nginx"), Some(true));
        assert_eq!(p.has_class("IngressClass", "traefik"), Some(false));
        assert_eq!(p.has_class("PriorityClass", "high"), Some(true));
        assert_eq!(p.has_class("StorageClass", "fast"), Some(false));
        assert_eq!(p.has_class("Deployment", "web"), None);
        p.incomplete.push("ingress classes: forbidden".into());
        assert_eq!(p.has_class("IngressClass", "traefik"), None, "unread list");
        assert_eq!(p.has_class("IngressClass", "nginx"), Some(true));
        assert_eq!(
            ClusterProfile::default().has_class("StorageClass", "fast"),
            None,
            "an empty profile knows nothing"
        );
    }

    #[test]
    fn minor_versions_with_vendor_suffixes_parse() {
        assert_eq!(parse_minor("37", "v1.37.2"), 37);
        assert_eq!(parse_minor("30+", "v1.30.4-eks-a737599"), 30);
        assert_eq!(parse_minor("", "v1.24.17"), 24);
        assert_eq!(parse_minor("", "garbage"), 0);
    }

    #[test]
    fn distribution_is_guessed_from_version_and_labels() {
        let none = BTreeSet::new();
        assert_eq!(guess_distribution("v1.30.4-eks-a737599", &none), "eks");
        assert_eq!(guess_distribution("v1.31.1-gke.1146000", &none), "gke");
        assert_eq!(guess_distribution("v1.31.1+k3s1", &none), "k3s");
        let aks = BTreeSet::from(["kubernetes.azure.com/cluster".to_string()]);
        assert_eq!(guess_distribution("v1.31.1", &aks), "aks");
        assert_eq!(guess_distribution("v1.37.2", &none), "kubernetes");
    }

    #[test]
    fn profile_round_trips_as_json() {
        let profile = ClusterProfile {
            version: "v1.37.2".into(),
            major: 1,
            minor: 37,
            served_group_versions: BTreeSet::from(["apps/v1".to_string()]),
            ..Default::default()
        };
        let json = serde_json::to_string(&profile).unwrap();
        assert_eq!(
            serde_json::from_str::<ClusterProfile>(&json).unwrap(),
            profile
        );
        assert!(profile.serves("apps/v1"));
        assert!(!profile.serves("batch/v1beta1"));
    }
}
