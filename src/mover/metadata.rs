//! Changed-block tracking through Kubernetes' CSI SnapshotMetadata API
//! (`cbt.storage.k8s.io`): a CSI driver that serves it has a
//! SnapshotMetadataService object naming where its external-snapshot-metadata
//! sidecar listens (gRPC over TLS), the CA that signed the sidecar's
//! certificate and the audience the caller's ServiceAccount token must be
//! issued for. The sidecar checks the token (TokenReview) and that its
//! ServiceAccount may get VolumeSnapshots in the namespace
//! (SubjectAccessReview), then streams the byte ranges that changed
//! between two snapshots of a block volume.
//!
//! The CLI (or the controller) finds the service and mints the token; the
//! mover Pod, which runs in the cluster and so reaches the sidecar's
//! address, asks for the ranges and reads only them.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::core::GroupVersionKind;

/// Environment of a mover that reads only changed blocks: the token (from
/// the mover's Secret) and the sidecar's CA certificate (PEM).
pub const TOKEN_ENV: &str = "FERRY_SNAPSHOT_METADATA_TOKEN";
pub const CA_ENV: &str = "FERRY_SNAPSHOT_METADATA_CA";

/// How long a minted token lives: a mover that waits longer for its slot
/// reads its device whole.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Ranges asked for per streamed message.
const MAX_RESULTS: i32 = 1024;

/// A CSI driver's SnapshotMetadataService.
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataService {
    /// `host:port` of the sidecar.
    pub address: String,
    /// PEM of the CA that signed the sidecar's certificate.
    pub ca_cert: Vec<u8>,
    /// What the caller's token must be issued for.
    pub audience: String,
}

/// The ServiceAccount whose tokens a backup shows the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for ServiceAccountRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
                Ok(ServiceAccountRef {
                    namespace: namespace.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!("'{s}' is not NAMESPACE/NAME of a ServiceAccount")),
        }
    }
}

impl std::fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "cbt.storage.k8s.io",
        "v1beta1",
        "SnapshotMetadataService",
    ))
}

/// The SnapshotMetadataService of `driver` (named after it), `None` when
/// the cluster has none or does not serve the API.
pub async fn service_for(
    client: &kube::Client,
    driver: &str,
) -> Result<Option<MetadataService>, String> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource());
    let object = match api.get_opt(driver).await {
        Ok(Some(object)) => object,
        Ok(None) => return Ok(None),
        // 404 of the resource itself: the API is not served.
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
        Err(e) => return Err(format!("reading SnapshotMetadataService {driver}: {e}")),
    };
    parse_service(driver, &object.data["spec"]).map(Some)
}

/// A SnapshotMetadataService's spec (`caCert` is base64, as byte fields
/// are in the API).
fn parse_service(driver: &str, spec: &serde_json::Value) -> Result<MetadataService, String> {
    use base64::Engine;
    let field = |name: &str| {
        spec[name]
            .as_str()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("SnapshotMetadataService {driver} has no spec.{name}"))
    };
    let ca_cert = base64::engine::general_purpose::STANDARD
        .decode(field("caCert")?)
        .map_err(|e| format!("SnapshotMetadataService {driver}: spec.caCert is not base64: {e}"))?;
    Ok(MetadataService {
        address: field("address")?.to_string(),
        ca_cert,
        audience: field("audience")?.to_string(),
    })
}

/// A token of `account` for `audience`, from the TokenRequest API.
pub async fn token(
    client: &kube::Client,
    account: &ServiceAccountRef,
    audience: &str,
) -> Result<String, String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &account.namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_string()]),
            expiration_seconds: Some(TOKEN_LIFETIME.as_secs() as i64),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued = api
        .create_token_request(&account.name, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("a token of ServiceAccount {account} for audience {audience}: {e}"))?;
    issued
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("the API server issued no token of ServiceAccount {account}"))
}

/// The messages of `snapshotmetadata.SnapshotMetadata` (the sidecar's
/// schema.proto), by field number.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetMetadataDeltaRequest {
        #[prost(string, tag = "1")]
        pub security_token: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(string, tag = "3")]
        pub base_snapshot_id: String,
        #[prost(string, tag = "4")]
        pub target_snapshot_name: String,
        #[prost(int64, tag = "5")]
        pub starting_offset: i64,
        #[prost(int32, tag = "6")]
        pub max_results: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetMetadataAllocatedRequest {
        #[prost(string, tag = "1")]
        pub security_token: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(string, tag = "3")]
        pub snapshot_name: String,
        #[prost(int64, tag = "4")]
        pub starting_offset: i64,
        #[prost(int32, tag = "5")]
        pub max_results: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BlockMetadata {
        #[prost(int64, tag = "1")]
        pub byte_offset: i64,
        #[prost(int64, tag = "2")]
        pub size_bytes: i64,
    }

    /// GetMetadataDeltaResponse and GetMetadataAllocatedResponse alike.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetadataResponse {
        #[prost(int32, tag = "1")]
        pub block_metadata_type: i32,
        #[prost(int64, tag = "2")]
        pub volume_capacity_bytes: i64,
        #[prost(message, repeated, tag = "3")]
        pub block_metadata: Vec<BlockMetadata>,
    }
}

/// What changed in a block volume between two of its snapshots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangedBlocks {
    /// (offset, length) of every changed range.
    pub ranges: Vec<(u64, u64)>,
    pub capacity: u64,
}

/// Asks the sidecar at `service` which ranges of the VolumeSnapshot
/// `namespace/target` changed since the snapshot whose CSI handle is
/// `base_handle`.
pub async fn changed_blocks(
    service: &MetadataService,
    token: &str,
    namespace: &str,
    base_handle: &str,
    target: &str,
) -> Result<ChangedBlocks, String> {
    stream_ranges(
        service,
        "/snapshotmetadata.SnapshotMetadata/GetMetadataDelta",
        |offset| proto::GetMetadataDeltaRequest {
            security_token: token.to_string(),
            namespace: namespace.to_string(),
            base_snapshot_id: base_handle.to_string(),
            target_snapshot_name: target.to_string(),
            starting_offset: offset,
            max_results: MAX_RESULTS,
        },
    )
    .await
}

/// Asks the sidecar at `service` which ranges of the VolumeSnapshot
/// `namespace/snapshot` hold data; the rest reads as zeros.
pub async fn allocated_blocks(
    service: &MetadataService,
    token: &str,
    namespace: &str,
    snapshot: &str,
) -> Result<ChangedBlocks, String> {
    stream_ranges(
        service,
        "/snapshotmetadata.SnapshotMetadata/GetMetadataAllocated",
        |offset| proto::GetMetadataAllocatedRequest {
            security_token: token.to_string(),
            namespace: namespace.to_string(),
            snapshot_name: snapshot.to_string(),
            starting_offset: offset,
            max_results: MAX_RESULTS,
        },
    )
    .await
}

/// Calls the streaming method `path` with the requests `request` makes
/// for a starting offset, collecting every range. A stream cut short is
/// resumed from the end of the last range received.
async fn stream_ranges<M>(
    service: &MetadataService,
    path: &'static str,
    request: impl Fn(i64) -> M,
) -> Result<ChangedBlocks, String>
where
    M: prost::Message + Default + Send + Sync + 'static,
{
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&service.ca_cert));
    let (host, _) = service
        .address
        .rsplit_once(':')
        .ok_or_else(|| format!("address {} has no port", service.address))?;
    let tls = tls.domain_name(host.trim_matches(['[', ']']));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", service.address))
        .map_err(|e| format!("address {}: {e}", service.address))?
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .map_err(|e| format!("TLS for {}: {e}", service.address))?
        .connect()
        .await
        .map_err(|e| format!("connecting to {}: {}", service.address, error_chain(&e)))?;
    let mut client = tonic::client::Grpc::new(channel);
    let mut out = ChangedBlocks::default();
    let mut offset = 0i64;
    let mut attempts = 0;
    loop {
        client
            .ready()
            .await
            .map_err(|e| format!("{}: {e}", service.address))?;
        let streamed = client
            .server_streaming(
                tonic::Request::new(request(offset)),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<M, proto::MetadataResponse>::default(),
            )
            .await;
        let mut stream = match streamed {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(describe(&status, &service.address)),
        };
        let ended = loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    out.capacity = message.volume_capacity_bytes.max(0) as u64;
                    for block in message.block_metadata {
                        if block.byte_offset < 0 || block.size_bytes < 0 {
                            return Err(format!(
                                "{} sent a negative range ({}, {})",
                                service.address, block.byte_offset, block.size_bytes
                            ));
                        }
                        out.ranges
                            .push((block.byte_offset as u64, block.size_bytes as u64));
                        offset = offset.max(block.byte_offset + block.size_bytes);
                    }
                }
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        };
        match ended {
            None => return Ok(out),
            // A stream cut short (the sidecar bounds a stream's duration,
            // a connection drops) goes on from the last range received.
            Some(status)
                if attempts < 3
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Aborted
                    ) =>
            {
                attempts += 1;
            }
            Some(status) => return Err(describe(&status, &service.address)),
        }
    }
}

fn describe(status: &tonic::Status, address: &str) -> String {
    let hint = match status.code() {
        tonic::Code::Unauthenticated => " (the token was refused: wrong audience, or expired)",
        tonic::Code::PermissionDenied => {
            " (the ServiceAccount may not get VolumeSnapshots in this namespace)"
        }
        _ => "",
    };
    format!(
        "the snapshot metadata service at {address}: {:?}: {}{hint}",
        status.code(),
        status.message()
    )
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use serde_json::json;

    #[test]
    fn a_service_is_read_from_its_spec_and_a_missing_field_is_named() {
        let spec =
            json!({"address": "10.0.0.1:6443", "caCert": "LS0tLS1CRUdJTg==", "audience": "backup"});
        let service = parse_service("csi.example.com", &spec).unwrap();
        assert_eq!(service.address, "10.0.0.1:6443");
        assert_eq!(service.ca_cert, b"-----BEGIN");
        assert_eq!(service.audience, "backup");
        let err = parse_service(
            "csi.example.com",
            &json!({"address": "a:1", "caCert": "eA=="}),
        )
        .unwrap_err();
        assert!(
            err.contains("csi.example.com") && err.contains("spec.audience"),
            "{err}"
        );
        let err = parse_service(
            "d",
            &json!({"address": "a:1", "caCert": "%%", "audience": "x"}),
        )
        .unwrap_err();
        assert!(err.contains("not base64"), "{err}");
    }

    #[test]
    fn service_accounts_are_namespace_slash_name() {
        let account: ServiceAccountRef = "ferry-system/ferry".parse().unwrap();
        assert_eq!(account.to_string(), "ferry-system/ferry");
        assert!("ferry".parse::<ServiceAccountRef>().is_err());
        assert!("/ferry".parse::<ServiceAccountRef>().is_err());
    }

    #[test]
    fn messages_use_the_field_numbers_of_the_schema() {
        // GetMetadataDeltaRequest{namespace: "ns", starting_offset: 1}:
        // field 2 (length-delimited) and field 5 (varint).
        let request = proto::GetMetadataDeltaRequest {
            namespace: "ns".into(),
            starting_offset: 1,
            ..Default::default()
        };
        assert_eq!(request.encode_to_vec(), vec![0x12, 2, b'n', b's', 0x28, 1]);
        // A response with capacity 4096 and one range (8192, 4096).
        let bytes = [
            0x08, 2, 0x10, 0x80, 0x20, 0x1a, 6, 0x08, 0x80, 0x40, 0x10, 0x80, 0x20,
        ];
        let response = proto::MetadataResponse::decode(&bytes[..]).unwrap();
        assert_eq!(response.block_metadata_type, 2);
        assert_eq!(response.volume_capacity_bytes, 4096);
        assert_eq!(
            response.block_metadata,
            vec![proto::BlockMetadata {
                byte_offset: 8192,
                size_bytes: 4096
            }]
        );
    }
}
