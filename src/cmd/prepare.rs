//! `sdfleet prepare-models-dir`: the agent DaemonSet's init container.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// The models root (the hostPath mount).
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    model_set: String,
    /// `UID:GID` that will own the directory.
    #[arg(long, value_parser = parse_owner)]
    owner: (u32, u32),
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = s.split_once(':').ok_or("expected UID:GID")?;
    Ok((
        uid.parse().map_err(|e| format!("uid {uid:?}: {e}"))?,
        gid.parse().map_err(|e| format!("gid {gid:?}: {e}"))?,
    ))
}

/// Creates the directory and gives it to the agent's user.
pub fn run(args: PrepareArgs) -> Result<String, Box<dyn std::error::Error>> {
    let dir = crate::sync::models_dir::prepare(
        &args.root,
        &args.namespace,
        &args.model_set,
        args.owner.0,
        args.owner.1,
    )?;
    Ok(format!("prepared {}\n", dir.display()))
}
