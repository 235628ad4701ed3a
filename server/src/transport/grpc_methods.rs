//! The gRPC methods the daemon serves, from the descriptor sets (ours,
//! health, reflection): which request paths are gRPC methods at all, and
//! which of them stream. Request metrics label only these paths; the
//! authentication and limit layers treat streaming calls apart.

use std::collections::HashMap;
use std::sync::OnceLock;

/// Whether a request is gRPC (any `application/grpc*` content type).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Whether a request calls a streaming gRPC method the daemon serves.
pub fn is_streaming_grpc<B>(request: &http::Request<B>) -> bool {
    is_grpc(request.headers())
        && grpc_methods()
            .get(request.uri().path())
            .copied()
            .unwrap_or(false)
}

/// The paths (`/package.Service/Method`) of every gRPC method the daemon
/// serves — ours from the descriptor set, plus health and reflection — each
/// with whether it streams (either way).
pub fn grpc_methods() -> &'static HashMap<String, bool> {
    static METHODS: OnceLock<HashMap<String, bool>> = OnceLock::new();
    METHODS.get_or_init(|| {
        let mut out = HashMap::new();
        for set in [
            strata_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(set) else {
                tracing::error!("a descriptor set does not decode; its methods count as unmatched");
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        out.insert(
                            format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                            method.server_streaming() || method.client_streaming(),
                        );
                    }
                }
            }
        }
        for reflection in [
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            out.insert(reflection.to_owned(), true);
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The threat model's "Metrics labels" (docs/security.md): only methods the daemon serves can
    /// become a label, and the set knows which of them stream.
    #[test]
    fn only_served_grpc_methods_are_labels_finding_1() {
        let methods = grpc_methods();
        assert_eq!(methods.get("/strata.v1.ConfigService/Watch"), Some(&true));
        assert_eq!(
            methods.get("/strata.v1.RegistryService/KeepAlive"),
            Some(&true)
        );
        assert_eq!(
            methods.get("/strata.v1.TenantService/ListTenants"),
            Some(&false)
        );
        assert_eq!(methods.get("/grpc.health.v1.Health/Check"), Some(&false));
        assert_eq!(methods.get("/strata.v1.ConfigService/Nope"), None);
        assert_eq!(methods.get(&format!("/{}", "x".repeat(60_000))), None);
    }
}
