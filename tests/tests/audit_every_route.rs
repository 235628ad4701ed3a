//! Every HTTP route and every gRPC method, walked from the daemon's own
//! route tables and the service descriptors (not from a list kept here):
//! a call that changes state is recorded with the operation, project and
//! tenant it named — also when it is refused for permission — and a read
//! or a lease renewal is not recorded.
//!
//! The daemon records every refusal (`audit.refusals = "all"`), so a call
//! whose made-up arguments are refused still shows what the handler stated.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::{Buf, BufMut};
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use strata_proto::v1::audit_service_client::AuditServiceClient;
use strata_proto::v1::token_service_client::TokenServiceClient;
use strata_proto::v1::{AuditEntry, CreateTokenRequest, QueryAuditRequest, Role};
use strata_tests::{AuthChannel, Daemon, http_request_as};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// The naming rule of the API: a method whose name starts with one of these
/// verbs changes state; every other method reads or renews a lease.
const CHANGING_VERBS: &[&str] = &[
    "Create",
    "Update",
    "Delete",
    "Put",
    "Register",
    "Deregister",
    "Drain",
    "Rollback",
    "Revoke",
    "Import",
];

fn changes_state(method: &str) -> bool {
    CHANGING_VERBS.iter().any(|v| method.starts_with(v))
}

/// A gRPC method as the descriptor set describes it.
struct Method {
    path: String,
    name: String,
    client_streaming: bool,
    server_streaming: bool,
    /// Numbers of the request's singular string fields, by name.
    strings: BTreeMap<String, i32>,
    /// The request field naming the tenant (`name` in `TenantService`).
    tenant_field: Option<&'static str>,
}

fn methods() -> Vec<Method> {
    let set = prost_types::FileDescriptorSet::decode(strata_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut messages = BTreeMap::new();
    for file in &set.file {
        for m in &file.message_type {
            messages.insert(format!(".{}.{}", file.package(), m.name()), m.clone());
        }
    }
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                let input = &messages[method.input_type()];
                let strings: BTreeMap<String, i32> = input
                    .field
                    .iter()
                    .filter(|f| f.r#type() == Type::String && f.label() != Label::Repeated)
                    .map(|f| (f.name().to_owned(), f.number()))
                    .collect();
                let tenant_field = if strings.contains_key("tenant") {
                    Some("tenant")
                } else if service.name() == "TenantService" && strings.contains_key("name") {
                    Some("name")
                } else {
                    None
                };
                out.push(Method {
                    path: format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    name: method.name().to_owned(),
                    client_streaming: method.client_streaming(),
                    server_streaming: method.server_streaming(),
                    strings,
                    tenant_field,
                });
            }
        }
    }
    out
}

/// A request message with every singular string field set to `value`.
fn message(method: &Method, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for number in method.strings.values() {
        prost::encoding::string::encode(*number as u32, &value.to_owned(), &mut out);
    }
    out
}

/// Passes encoded messages through unchanged, whatever the method.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// Calls `method` with one request message; the status code it ended with
/// (`Ok` for a stream that opened).
async fn call(channel: AuthChannel, method: &Method, body: Vec<u8>) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path: http::uri::PathAndQuery = method.path.parse().unwrap();
    let outcome = match (method.client_streaming, method.server_streaming) {
        (false, false) => grpc
            .unary(tonic::Request::new(body), path, RawCodec)
            .await
            .map(drop),
        (false, true) => grpc
            .server_streaming(tonic::Request::new(body), path, RawCodec)
            .await
            .map(drop),
        (true, false) => grpc
            .client_streaming(
                tonic::Request::new(futures::stream::iter([body])),
                path,
                RawCodec,
            )
            .await
            .map(drop),
        (true, true) => grpc
            .streaming(
                tonic::Request::new(futures::stream::iter([body])),
                path,
                RawCodec,
            )
            .await
            .map(drop),
    };
    match outcome {
        Ok(()) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

/// Every audit entry.
async fn entries(daemon: &Daemon) -> Vec<AuditEntry> {
    AuditServiceClient::new(daemon.channel().await)
        .query(QueryAuditRequest {
            limit: 10_000,
            ..QueryAuditRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// The entries a step added (entries of one millisecond sort by a random
/// nonce, so new ones are told apart by content, not position).
#[derive(Default)]
struct Log {
    seen: std::collections::HashSet<Vec<u8>>,
}

impl Log {
    async fn new_entries(&mut self, daemon: &Daemon) -> Vec<AuditEntry> {
        let mut fresh = Vec::new();
        for entry in entries(daemon).await {
            if self.seen.insert(entry.encode_to_vec()) {
                fresh.push(entry);
            }
        }
        fresh
    }
}

/// What a call named, and so what its entry must say.
struct Named<'a> {
    what: String,
    project: &'a str,
    tenant: &'a str,
    actor: &'a str,
}

/// The one entry of a state-changing call: named as it was called.
fn one_entry<'a>(fresh: &'a [AuditEntry], named: &Named<'_>) -> &'a AuditEntry {
    assert_eq!(
        fresh.len(),
        1,
        "{}: one entry expected: {fresh:#?}",
        named.what
    );
    let entry = &fresh[0];
    assert_eq!(
        (
            entry.project.as_str(),
            entry.tenant.as_str(),
            entry.actor_name.as_str()
        ),
        (named.project, named.tenant, named.actor),
        "{}: {entry:#?}",
        named.what
    );
    entry
}

#[tokio::test]
async fn every_route_and_method_that_changes_state_is_recorded_with_what_it_named() {
    let daemon = Daemon::builder()
        .config("[audit]\nrefusals = \"all\"\nmax_refusals_per_minute = 0\n")
        .start()
        .await;
    let reader = TokenServiceClient::new(daemon.channel().await)
        .create_token(CreateTokenRequest {
            name: "reader".into(),
            role: Role::Read as i32,
            project: "vega".into(),
            ..CreateTokenRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let admin = daemon.admin_token();
    let mut log = Log::default();
    log.new_entries(&daemon).await;
    let mut step = 0;
    let mut unique = |prefix: &str| {
        step += 1;
        format!("{prefix}{step}")
    };

    // gRPC, from the descriptor set.
    let methods = methods();
    assert!(methods.len() >= 25, "the descriptor set lists the API");
    let mut changing = BTreeSet::new();
    for method in &methods {
        for (actor, token) in [("reader", reader.as_str()), ("bootstrap-admin", &admin)] {
            let value = unique("m");
            let channel = daemon.channel_as(Some(token)).await;
            let code = tokio::time::timeout(
                Duration::from_secs(10),
                call(channel, method, message(method, &value)),
            )
            .await
            .unwrap_or_else(|_| panic!("{} did not answer", method.path));
            let fresh = log.new_entries(&daemon).await;
            if !changes_state(&method.name) {
                assert!(fresh.is_empty(), "{} recorded: {fresh:#?}", method.path);
                continue;
            }
            changing.insert(method.name.clone());
            let named = Named {
                what: format!("{} as {actor} ({code:?})", method.path),
                project: if method.strings.contains_key("project") {
                    &value
                } else {
                    ""
                },
                tenant: if method.tenant_field.is_some() {
                    &value
                } else {
                    ""
                },
                actor,
            };
            let entry = one_entry(&fresh, &named);
            assert_eq!(entry.operation, method.name, "{}", named.what);
            assert_eq!(entry.transport, "grpc");
            if actor == "reader" {
                assert_eq!(code, tonic::Code::PermissionDenied, "{}", named.what);
                assert_eq!(entry.result, "permission_denied", "{}", named.what);
            }
        }
    }
    assert!(changing.contains("PutConfig") && changing.contains("RegisterBranch"));

    // HTTP, from the route tables the router is built from.
    let routes = strata_server::transport::router::http_routes();
    assert!(routes.len() >= 20, "the route tables list the API");
    let mut operations_by_route = BTreeMap::new();
    for (method, path) in routes {
        // Renewing a lease changes no object: not recorded (and not a
        // verb of its own over HTTP).
        let renewal = path.ends_with("/heartbeat");
        let changing_route = method != http::Method::GET && !renewal;
        let mut operation_seen = None;
        for (actor, token) in [("reader", reader.as_str()), ("bootstrap-admin", &admin)] {
            let value = unique("h");
            let uri = path
                .replace("{project}", &value)
                .replace("{tenant}", &value)
                .replace("{service}", &value)
                .replace("{id}", &value)
                .replace("{*key}", &format!("{value}/k.json"))
                .replace("{lease}", "1");
            let body: &[u8] = if method == http::Method::GET {
                b""
            } else {
                b"{}"
            };
            let (status, text) = http_request_as(
                daemon.addr,
                method.as_str(),
                &uri,
                &[("authorization", &format!("Bearer {token}"))],
                body,
            )
            .await
            .unwrap();
            let fresh = log.new_entries(&daemon).await;
            if !changing_route {
                assert!(fresh.is_empty(), "{method} {path} recorded: {fresh:#?}");
                continue;
            }
            let named = Named {
                what: format!("{method} {uri} as {actor} ({status} {text})"),
                project: if path.contains("{project}") {
                    &value
                } else {
                    ""
                },
                tenant: if path.contains("{tenant}") {
                    &value
                } else {
                    ""
                },
                actor,
            };
            let entry = one_entry(&fresh, &named);
            assert!(
                changing.contains(&entry.operation),
                "{}: {:?} is not a state-changing gRPC method",
                named.what,
                entry.operation
            );
            assert_eq!(entry.transport, "http");
            if actor == "reader" {
                assert_eq!(status, 403, "{}", named.what);
                assert_eq!(entry.result, "permission_denied", "{}", named.what);
            }
            match &operation_seen {
                None => operation_seen = Some(entry.operation.clone()),
                Some(op) => assert_eq!(op, &entry.operation, "{}", named.what),
            }
        }
        if let Some(op) = operation_seen {
            operations_by_route.insert(format!("{method} {path}"), op);
        }
    }
    // Each state-changing route does one thing of its own.
    let distinct: BTreeSet<&String> = operations_by_route.values().collect();
    assert_eq!(
        distinct.len(),
        operations_by_route.len(),
        "two routes record the same operation: {operations_by_route:#?}"
    );
    assert!(operations_by_route.len() >= 9, "{operations_by_route:#?}");
}
