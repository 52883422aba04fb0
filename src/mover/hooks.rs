//! Hooks: commands run in a Pod's container through the API server's exec
//! before and after a backup takes its volumes, so that an application can
//! flush and quiesce (a database checkpoint, `fsfreeze`). Declared by
//! annotations on the Pod, Ferry's own or Velero's, so applications
//! annotated for Velero keep their hooks:
//!
//! ```text
//! pre.hook.backup.ferry.dev/command: '["/bin/sh", "-c", "pg_ctl … checkpoint"]'
//! pre.hook.backup.ferry.dev/container: db          (default: the first)
//! pre.hook.backup.ferry.dev/on-error: Fail         (or Continue)
//! pre.hook.backup.ferry.dev/timeout: 30s
//! post.hook.backup.ferry.dev/command: …            (and the same for post)
//! pre.hook.backup.velero.io/command: …             (Velero's, same fields)
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::MoverError;

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookPhase {
    Pre,
    Post,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OnError {
    /// The backup fails with the hook's output.
    #[default]
    Fail,
    /// The failure is a warning of the backup.
    Continue,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    pub phase: HookPhase,
    /// The container; `None` is the Pod's first.
    pub container: Option<String>,
    pub command: Vec<String>,
    pub on_error: OnError,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Where it was declared (the annotation prefix), for messages.
    pub source: String,
}

mod humantime_serde_compat {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

const PREFIXES: &[(&str, HookPhase)] = &[
    ("pre.hook.backup.ferry.dev", HookPhase::Pre),
    ("post.hook.backup.ferry.dev", HookPhase::Post),
    ("pre.hook.backup.velero.io", HookPhase::Pre),
    ("post.hook.backup.velero.io", HookPhase::Post),
];

/// The hooks a Pod's annotations declare. A malformed annotation is an
/// error naming it: a hook silently not run is a backup silently
/// inconsistent.
pub fn hooks_of(annotations: &BTreeMap<String, String>) -> Result<Vec<Hook>, String> {
    let mut hooks = Vec::new();
    for (prefix, phase) in PREFIXES {
        let get = |field: &str| annotations.get(&format!("{prefix}/{field}"));
        let Some(command) = get("command") else {
            continue;
        };
        let command: Vec<String> = if command.trim_start().starts_with('[') {
            serde_json::from_str(command).map_err(|e| {
                format!("annotation {prefix}/command is not a JSON array of strings: {e}")
            })?
        } else {
            vec![command.clone()]
        };
        if command.is_empty() {
            return Err(format!("annotation {prefix}/command is empty"));
        }
        let on_error = match get("on-error").map(|s| s.to_ascii_lowercase()).as_deref() {
            None | Some("fail") => OnError::Fail,
            Some("continue") => OnError::Continue,
            Some(other) => {
                return Err(format!(
                    "annotation {prefix}/on-error is '{other}'; use Fail or Continue"
                ));
            }
        };
        let timeout = match get("timeout") {
            None => Duration::from_secs(30),
            Some(t) => humantime::parse_duration(t)
                .map_err(|e| format!("annotation {prefix}/timeout '{t}': {e}"))?,
        };
        hooks.push(Hook {
            phase: *phase,
            container: get("container").cloned(),
            command,
            on_error,
            timeout,
            source: prefix.to_string(),
        });
    }
    Ok(hooks)
}

/// Runs `hook` in `pod`; returns what it printed. A failure with
/// `OnError::Continue` comes back as `Ok(Some(warning))`.
pub(super) async fn run(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    hook: &Hook,
) -> Result<Option<String>, MoverError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let named = format!("{namespace}/{pod}");
    let described = format!("{} {:?}", hook.source, hook.command);
    let fail = |message: String| MoverError::Hook {
        pod: named.clone(),
        hook: described.clone(),
        message,
    };
    let mut params = AttachParams::default()
        .stdout(true)
        .stderr(true)
        .stdin(false);
    if let Some(c) = &hook.container {
        params = params.container(c.clone());
    }
    let outcome = tokio::time::timeout(hook.timeout, async {
        let mut process = pods
            .exec(pod, hook.command.clone(), &params)
            .await
            .map_err(|e| format!("exec: {e}"))?;
        let mut out = String::new();
        let mut err = String::new();
        let mut stdout = process.stdout().ok_or("no stdout")?;
        let mut stderr = process.stderr().ok_or("no stderr")?;
        let status = process.take_status();
        let (a, b) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        a.and(b).map_err(|e| format!("reading its output: {e}"))?;
        let status = match status {
            Some(s) => s.await,
            None => None,
        };
        let output = format!("{out}{err}").trim().to_string();
        match status {
            Some(s) if s.status.as_deref() == Some("Success") => Ok(output),
            Some(s) => Err(format!(
                "{}; output: {output}",
                s.message.unwrap_or_else(|| "it failed".into())
            )),
            None => Err(format!("no exit status; output: {output}")),
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "timed out after {}",
            humantime::format_duration(hook.timeout)
        ))
    });
    match (outcome, hook.on_error) {
        (Ok(_), _) => Ok(None),
        (Err(message), OnError::Continue) => Ok(Some(
            fail(format!("{message} (on-error: Continue)")).to_string(),
        )),
        (Err(message), OnError::Fail) => Err(fail(message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ferry_and_velero_annotations_declare_hooks() {
        let hooks = hooks_of(&annotations(&[
            (
                "pre.hook.backup.ferry.dev/command",
                r#"["/bin/sh", "-c", "sync"]"#,
            ),
            ("pre.hook.backup.ferry.dev/container", "db"),
            ("pre.hook.backup.ferry.dev/timeout", "2m"),
            ("post.hook.backup.velero.io/command", "/bin/resume"),
            ("post.hook.backup.velero.io/on-error", "Continue"),
        ]))
        .unwrap();
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[0].phase, HookPhase::Pre);
        assert_eq!(hooks[0].command, ["/bin/sh", "-c", "sync"]);
        assert_eq!(hooks[0].container.as_deref(), Some("db"));
        assert_eq!(hooks[0].timeout, Duration::from_secs(120));
        assert_eq!(hooks[0].on_error, OnError::Fail);
        assert_eq!(hooks[1].phase, HookPhase::Post);
        assert_eq!(hooks[1].command, ["/bin/resume"]);
        assert_eq!(hooks[1].on_error, OnError::Continue);
        assert!(hooks_of(&annotations(&[("app", "x")])).unwrap().is_empty());
    }

    #[test]
    fn a_malformed_hook_is_an_error_naming_its_annotation() {
        for (key, value) in [
            ("pre.hook.backup.ferry.dev/on-error", "Maybe"),
            ("pre.hook.backup.ferry.dev/timeout", "soon"),
        ] {
            let error = hooks_of(&annotations(&[
                ("pre.hook.backup.ferry.dev/command", "true"),
                (key, value),
            ]))
            .unwrap_err();
            assert!(error.contains(key), "{error}");
        }
        let error = hooks_of(&annotations(&[(
            "pre.hook.backup.velero.io/command",
            "[1, 2",
        )]))
        .unwrap_err();
        assert!(
            error.contains("pre.hook.backup.velero.io/command"),
            "{error}"
        );
    }
}
