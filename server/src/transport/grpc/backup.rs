//! `strata.v1.BackupService`: export and import of backup files (the format
//! and the logic live in [`crate::app::backup`]). Admin only.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use strata_proto::v1::backup_service_server::BackupService;
use strata_proto::v1::{
    ErrorReason, ExportChunk, ExportRequest, ImportChunk, ImportResponse, ImportedProject,
    ResponseHeader,
};
use tonic::{Request, Response, Status, Streaming};

use crate::app::backup::{self, Selection};
use crate::error::ApiError;
use crate::transport::state::DaemonState;

/// gRPC handler of `BackupService`.
#[derive(Debug, Clone)]
pub struct BackupApi {
    state: Arc<DaemonState>,
}

impl BackupApi {
    /// A handler over the daemon's shared state.
    pub fn new(state: Arc<DaemonState>) -> Self {
        Self { state }
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision,
            member: self.state.member.clone(),
        })
    }
}

/// The one authorisation check of backup and restore: exporting one project
/// needs an admin token for that project; exporting everything and importing
/// need an admin token for every project.
fn authorize(extensions: &http::Extensions, project: Option<&str>) -> Result<(), ApiError> {
    let principal = crate::app::auth::principal_of(extensions)?;
    match project {
        Some(project) => principal.authorize(crate::app::auth::Action::Admin, project, ""),
        None => principal.require_admin(),
    }
}

/// Chunks of an export on their way to the client.
type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportChunk, Status>> + Send>>;

#[tonic::async_trait]
impl BackupService for BackupApi {
    type ExportStream = ExportStream;

    async fn export(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let selection = if request.get_ref().all {
            Selection::All
        } else if request.get_ref().project.is_empty() {
            return Err(ApiError::new(
                ErrorReason::InvalidArgument,
                "name the project to export, or export all",
            )
            .into());
        } else {
            Selection::Project(request.get_ref().project.clone())
        };
        let scope = match &selection {
            Selection::All => None,
            Selection::Project(p) => Some(p.as_str()),
        };
        authorize(request.extensions(), scope)?;
        let api = self.state.api()?.clone();
        let snapshot = backup::snapshot(&api, &selection).await?;
        tracing::info!(revision = snapshot.revision(), ?selection, "export");
        // A few chunks in flight: the encoder waits for a slow client
        // instead of buffering the whole file.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ExportChunk, Status>>(4);
        tokio::task::spawn_blocking(move || {
            let failed = tx.clone();
            let result = backup::encode(&snapshot, |data| {
                tx.blocking_send(Ok(ExportChunk { data })).is_ok()
            });
            if let Err(e) = result {
                let _ = failed.blocking_send(Err(e.into()));
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
        Ok(Response::new(stream))
    }

    async fn import(
        &self,
        request: Request<Streaming<ImportChunk>>,
    ) -> Result<Response<ImportResponse>, Status> {
        crate::app::audit::declare(crate::app::audit::Target::new(
            crate::app::audit::Operation::Import,
            "",
            "",
        ));
        authorize(request.extensions(), None)?;
        let api = self.state.api()?.clone();
        let mut stream = request.into_inner();
        let mut bytes = Vec::new();
        let mut options: Option<(String, bool)> = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if options.is_none() {
                options = Some((chunk.rename_to.clone(), chunk.dry_run));
            }
            if bytes.len() + chunk.data.len() > backup::MAX_IMPORT_BYTES {
                return Err(ApiError::new(
                    ErrorReason::LimitExceeded,
                    format!(
                        "backup file is larger than {} bytes; nothing was imported",
                        backup::MAX_IMPORT_BYTES
                    ),
                )
                .into());
            }
            bytes.extend_from_slice(&chunk.data);
        }
        let (rename_to, dry_run) = options.unwrap_or_default();
        let rename_to = (!rename_to.is_empty()).then_some(rename_to.as_str());
        let parsed = backup::parse(&api, &bytes, rename_to)?;
        backup::check_targets_absent(&api, &parsed)?;
        let revision = if dry_run {
            api.revision()
        } else {
            let revision = backup::import(&api, &parsed).await?;
            tracing::info!(
                revision,
                source_revision = parsed.header.source_revision,
                projects = ?parsed.projects.keys().collect::<Vec<_>>(),
                "import"
            );
            revision
        };
        let projects = parsed
            .projects
            .iter()
            .map(|(name, p)| ImportedProject {
                name: name.clone(),
                source_name: p.source_name().to_owned(),
                tenants: p.tenant_names(),
                layers: p.layer_count() as u64,
                versions: p.version_count() as u64,
                instances: p.instance_count() as u64,
            })
            .collect();
        Ok(Response::new(ImportResponse {
            header: self.header(revision),
            source_revision: parsed.header.source_revision,
            projects,
            dry_run,
        }))
    }
}
