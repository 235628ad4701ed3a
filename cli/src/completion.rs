//! `strata completion bash|zsh|fish|elvish|powershell` and `strata man`:
//! shell completion scripts and man pages generated from the same clap
//! definitions the CLI parses with, so they never drift from it.

use std::path::{Path, PathBuf};

use clap::{Args, Command};
use clap_complete::Shell;

use crate::ctx::Failure;

/// Arguments of `strata completion`.
#[derive(Debug, Args)]
pub(crate) struct CompletionArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

/// Arguments of `strata man`.
#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// Directory to write `strata.1` and one page per subcommand
    /// (`strata-config-put.1`, …) into; created when missing.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

/// Prints the completion script of `shell` for `command` to stdout (a
/// reader that stops early, like `| head`, is not an error).
pub(crate) fn completion(mut command: Command, args: &CompletionArgs) -> Result<(), Failure> {
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, name, &mut script);
    match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::Server(format!("cannot write the script: {e}")))
        }
        _ => Ok(()),
    }
}

/// Writes the man pages of `command` and of every subcommand into
/// `args.dir`; prints the paths written.
pub(crate) fn man(command: Command, args: &ManArgs) -> Result<(), Failure> {
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| Failure::Server(format!("cannot create {}: {e}", args.dir.display())))?;
    let mut written = Vec::new();
    write_pages(command.clone(), command.get_name(), &args.dir, &mut written)?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes the page of `command` (named `name`, e.g. `strata-config-put`)
/// and, below it, those of its subcommands.
fn write_pages(
    command: Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), Failure> {
    let command = command.name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .map_err(|e| Failure::Server(format!("cannot render the page of {name}: {e}")))?;
    std::fs::write(&path, page)
        .map_err(|e| Failure::Server(format!("cannot write {}: {e}", path.display())))?;
    written.push(path);
    for sub in command.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        write_pages(
            sub.clone(),
            &format!("{name}-{}", sub.get_name()),
            dir,
            written,
        )?;
    }
    Ok(())
}
