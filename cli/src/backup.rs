//! `strata export` and `strata import`: backup files of one project or of
//! the whole store (format: docs/backup.md). Both are admin operations.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use strata_client::proto::{ExportRequest, ImportChunk, ImportResponse};

use crate::ctx::{Ctx, Failure, err};
use crate::plan::{self, Change, Plan};

/// Size of the chunks a backup file is sent in.
const CHUNK_BYTES: usize = 64 * 1024;

/// `strata export`.
#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// Export every project instead of `--project`.
    #[arg(long)]
    all: bool,
    /// File to write (`-` for stdout), mode 0600. Written to `FILE.partial`
    /// first and renamed when complete, so a failed export never leaves a
    /// file that looks whole; an existing `FILE.partial` is an error.
    #[arg(long, short = 'f')]
    file: PathBuf,
}

/// `strata import`.
#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// Backup file to restore.
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Import the file's single project under this name (it must not exist).
    #[arg(long = "as", value_name = "PROJECT")]
    rename_to: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    yes: bool,
    /// Validate the file and show what would be created; write nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Runs `strata export`.
pub(crate) async fn export(ctx: &Ctx, args: ExportArgs) -> Result<(), Failure> {
    let client = ctx.connect().await?;
    let mut stream = client
        .backup()
        .export(ExportRequest {
            project: if args.all {
                String::new()
            } else {
                ctx.project.clone()
            },
            all: args.all,
        })
        .await
        .map_err(err)?
        .into_inner();
    let to_stdout = args.file.as_os_str() == "-";
    let partial = partial_path(&args.file);
    let mut sink: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(create_partial(&partial)?))
    };
    let mut bytes = 0usize;
    let mut header: Option<serde_json::Value> = None;
    let mut first_line = Vec::new();
    let result: Result<(), String> = async {
        while let Some(chunk) = stream.message().await.map_err(err)? {
            if header.is_none() {
                first_line.extend_from_slice(&chunk.data);
                if let Some(end) = first_line.iter().position(|b| *b == b'\n') {
                    header = serde_json::from_slice(&first_line[..end]).ok();
                }
            }
            bytes += chunk.data.len();
            sink.write_all(&chunk.data)
                .map_err(|e| format!("cannot write the backup: {e}"))?;
        }
        sink.flush()
            .map_err(|e| format!("cannot write the backup: {e}"))?;
        Ok(())
    }
    .await;
    drop(sink);
    if let Err(e) = result {
        if !to_stdout {
            let _ = std::fs::remove_file(&partial);
        }
        return Err(Failure::Server(e));
    }
    if !to_stdout {
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&partial, &args.file))
            .map_err(|e| format!("cannot finish {}: {e}", args.file.display()))?;
    }
    let header = header.unwrap_or_default();
    let fields = [
        ("file", json!(args.file.display().to_string())),
        ("projects", header["projects"].clone()),
        ("source_revision", header["source_revision"].clone()),
        ("bytes", json!(bytes)),
    ];
    if to_stdout {
        // The backup went to stdout; the summary must not mix into it.
        eprintln!(
            "{}",
            serde_json::Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            )
        );
    } else {
        ctx.out.record(&fields);
    }
    Ok(())
}

/// Creates the `.partial` file: new (never an existing file, nor a
/// symlink's target: another user who can write the directory could plant
/// one) and 0600 (a backup holds every config value of the project).
fn create_partial(partial: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(partial)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "cannot create {}: it already exists (left by an interrupted export, or \
                 not yours); remove it and export again",
                partial.display()
            ),
            _ => format!("cannot create {}: {e}", partial.display()),
        })
}

fn partial_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

async fn send(
    client: &strata_client::Connection,
    data: &[u8],
    rename_to: &str,
    dry_run: bool,
) -> Result<ImportResponse, Failure> {
    let mut chunks: Vec<ImportChunk> = data
        .chunks(CHUNK_BYTES)
        .map(|c| ImportChunk {
            data: c.to_vec(),
            ..ImportChunk::default()
        })
        .collect();
    if chunks.is_empty() {
        chunks.push(ImportChunk::default());
    }
    if let Some(first) = chunks.first_mut() {
        first.rename_to = rename_to.to_owned();
        first.dry_run = dry_run;
    }
    Ok(client
        .backup()
        .import(tokio_stream::iter(chunks))
        .await
        .map_err(err)?
        .into_inner())
}

/// Runs `strata import`: validates the file on the server (a dry run),
/// shows what it will create, asks, then imports.
pub(crate) async fn import(ctx: &Ctx, args: ImportArgs) -> Result<(), Failure> {
    let data = std::fs::read(&args.file)
        .map_err(|e| format!("cannot read {}: {e}", args.file.display()))?;
    let client = ctx.connect().await?;
    let rename_to = args.rename_to.clone().unwrap_or_default();
    let planned = send(&client, &data, &rename_to, true).await?;
    let mut plan = Plan::default();
    for p in &planned.projects {
        let from = if p.source_name == p.name {
            String::new()
        } else {
            format!(" from {}", p.source_name)
        };
        plan.push(
            Change::Create,
            format!("project {}{from}", p.name),
            format!(
                "{} tenant(s): {}; {} config layer(s), {} history version(s), {} persistent instance(s)",
                p.tenants.len(),
                p.tenants.join(", "),
                p.layers,
                p.versions,
                p.instances
            ),
        );
    }
    eprint!(
        "{}",
        plan.render(&format!(
            "Importing {} (taken at revision {}) creates:",
            args.file.display(),
            planned.source_revision
        ))
    );
    if args.dry_run {
        ctx.out
            .record(&[("dry_run", json!(true)), ("plan", plan.to_json())]);
        return Ok(());
    }
    plan::confirm("import this backup", args.yes)?;
    let done = send(&client, &data, &rename_to, false).await?;
    ctx.out.record(&[
        (
            "imported",
            json!(
                done.projects
                    .iter()
                    .map(|p| p.name.clone())
                    .collect::<Vec<_>>()
            ),
        ),
        (
            "tenants",
            json!(done.projects.iter().map(|p| p.tenants.len()).sum::<usize>()),
        ),
        (
            "layers",
            json!(done.projects.iter().map(|p| p.layers).sum::<u64>()),
        ),
        (
            "versions",
            json!(done.projects.iter().map(|p| p.versions).sum::<u64>()),
        ),
        (
            "instances",
            json!(done.projects.iter().map(|p| p.instances).sum::<u64>()),
        ),
        ("source_revision", json!(done.source_revision)),
        ("revision", json!(done.header.map_or(0, |h| h.revision))),
    ]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// docs/security.md, "`strata export` files": the unit half of
    /// `cli_export_partial_file_is_private_and_not_a_symlink_target_finding_8`
    /// in tests/tests/backup.rs.
    #[test]
    fn cli_partial_file_is_new_private_and_never_a_symlink_target_finding_8() {
        let dir = tempfile::tempdir().unwrap();
        let partial = partial_path(&dir.path().join("a.backup"));
        drop(create_partial(&partial).unwrap());
        let mode = std::fs::metadata(&partial).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = create_partial(&partial).unwrap_err();
        assert!(
            err.contains("already exists") && err.contains("a.backup.partial"),
            "{err}"
        );

        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let planted = partial_path(&dir.path().join("b.backup"));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let err = create_partial(&planted).unwrap_err();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
