//! The test environment itself: real versions, real controllers, real RBAC,
//! real S3, clusters isolated from each other.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::support::{
    TestNamespace, env, eventually, fresh_bucket, pinned_versions, s3_client, unique_name,
};

#[tokio::test]
async fn each_cluster_reports_the_version_it_claims() {
    let pinned = pinned_versions();
    for (name, key) in [
        ("a", "K8S_NEW_VERSION"),
        ("b", "K8S_NEW_VERSION"),
        ("old", "K8S_OLD_VERSION"),
    ] {
        let cluster = env().cluster(name);
        assert_eq!(
            cluster.version, pinned[key],
            "environment description of cluster {name}"
        );
        let info = cluster
            .client()
            .await
            .apiserver_version()
            .await
            .expect("GET /version");
        assert_eq!(info.git_version, pinned[key], "/version of cluster {name}");
    }
}

async fn serves(client: &kube::Client, group_version: &str) -> bool {
    let (group, version) = group_version.split_once('/').unwrap();
    match client.list_api_group_resources(group_version).await {
        Ok(list) => {
            assert_eq!(list.group_version, format!("{group}/{version}"));
            list.resources.iter().any(|r| r.kind == "CronJob")
        }
        Err(kube::Error::Api(status)) if status.code == 404 => false,
        Err(e) => panic!("discovery of {group_version}: {e}"),
    }
}

#[tokio::test]
async fn old_cluster_serves_batch_v1beta1_cronjob_and_newest_does_not() {
    let old = env().old().client().await;
    let new = env().primary().client().await;
    assert!(
        serves(&old, "batch/v1beta1").await,
        "v1.24 must serve batch/v1beta1 CronJob"
    );
    assert!(serves(&old, "batch/v1").await);
    assert!(
        !serves(&new, "batch/v1beta1").await,
        "the newest release must not serve batch/v1beta1"
    );
    assert!(serves(&new, "batch/v1").await);
}

#[tokio::test]
async fn deployment_gets_replicaset_and_namespace_deletion_removes_everything() {
    let client = env().primary().client().await;
    let ns = TestNamespace::create(&client, "t-ctrl").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}
            }
        }
    }))
    .unwrap();
    let created = deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    let uid = created.metadata.uid.clone().unwrap();

    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    let rs = eventually(
        "the deployment controller to create a ReplicaSet",
        Duration::from_secs(30),
        || async {
            replica_sets
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .next()
        },
    )
    .await;
    let owner = &rs
        .metadata
        .owner_references
        .as_ref()
        .expect("owner references")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Deployment", uid.as_str())
    );
    assert_eq!(rs.spec.replicas, Some(2));

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(&ns.name, &DeleteParams::default())
        .await
        .expect("delete namespace");
    eventually(
        "the namespace controller to remove the namespace",
        Duration::from_secs(60),
        || async {
            match namespaces.get_opt(&ns.name).await {
                Ok(None) => Some(()),
                _ => None,
            }
        },
    )
    .await;
    assert!(
        deployments
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        replica_sets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn minio_round_trips_an_object_through_aws_sdk_s3() {
    let bucket = fresh_bucket("t-s3").await;
    let s3 = s3_client().await;
    let body: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    s3.put_object()
        .bucket(&bucket)
        .key("dir/object.bin")
        .body(body.clone().into())
        .send()
        .await
        .expect("put object");
    let got = s3
        .get_object()
        .bucket(&bucket)
        .key("dir/object.bin")
        .send()
        .await
        .expect("get object");
    let bytes = got.body.collect().await.unwrap().into_bytes();
    assert_eq!(bytes.len(), body.len());
    assert!(
        bytes.as_ref() == body.as_slice(),
        "object read back differs"
    );
    let missing = s3
        .get_object()
        .bucket(&bucket)
        .key("dir/missing")
        .send()
        .await;
    assert!(missing.is_err(), "a missing key must be an error");
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}
    }))
    .unwrap()
}

#[tokio::test]
async fn edit_only_user_is_refused_outside_its_namespace_and_allowed_inside() {
    let cluster = env().primary();
    let admin = cluster.client().await;
    // The static 'developer' user only has 'edit' in one namespace.
    let edit_namespace = cluster.users["developer"]
        .edit_namespace
        .clone()
        .expect("developer's namespace");
    let developer = cluster.client_as("developer").await;
    let inside: Api<ConfigMap> = Api::namespaced(developer.clone(), &edit_namespace);
    let name = unique_name("t-rbac");
    inside
        .create(&PostParams::default(), &config_map(&name))
        .await
        .expect("developer may create in team-a");
    inside
        .delete(&name, &DeleteParams::default())
        .await
        .expect("developer may delete in team-a");

    let other = TestNamespace::create(&admin, "t-rbac").await;
    let outside: Api<ConfigMap> = Api::namespaced(developer.clone(), &other.name);
    match outside
        .create(&PostParams::default(), &config_map("x"))
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("developer must be refused outside team-a, got {other:?}"),
    }
    match outside.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("developer must not list outside team-a, got {other:?}"),
    }
    let namespaces: Api<Namespace> = Api::all(developer);
    match namespaces.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("developer must not list namespaces, got {other:?}"),
    }
}

#[tokio::test]
async fn two_clusters_run_side_by_side_with_separate_data() {
    let a = env().primary();
    let b = env().secondary();
    assert_ne!(a.server, b.server);
    let client_a = a.client().await;
    let client_b = b.client().await;
    let ns = TestNamespace::create(&client_a, "t-sep").await;
    Api::<ConfigMap>::namespaced(client_a.clone(), &ns.name)
        .create(&PostParams::default(), &config_map("only-in-a"))
        .await
        .unwrap();
    let in_b: Api<Namespace> = Api::all(client_b.clone());
    assert!(
        in_b.get_opt(&ns.name).await.unwrap().is_none(),
        "cluster b must not see cluster a's namespace"
    );
    // Both clusters run their own controller-manager: each publishes its own root CA.
    let ca_a = Api::<ConfigMap>::namespaced(client_a, "team-a")
        .get("kube-root-ca.crt")
        .await
        .unwrap();
    let ca_b = Api::<ConfigMap>::namespaced(client_b, "team-a")
        .get("kube-root-ca.crt")
        .await
        .unwrap();
    assert_ne!(ca_a.data, ca_b.data, "each cluster has its own CA");
}
