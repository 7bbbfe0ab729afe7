//! Simulated node agents for `bench/fleet-scale/bench.py`: one real `sdfleet::agent::Agent`
//! per node, all in one process (1,000 agent processes would not fit 2 cores). Each has a
//! client of its own that acts as the chart's agent ServiceAccount with a token naming
//! its node (impersonation with the `authentication.kubernetes.io/node-name` extra, the
//! claim of the bound token kubelet gives a real agent's pod), so the apiserver applies
//! the chart's RBAC and admission policies to it as to a real agent. Each syncs the real
//! bucket (moto) into a directory of its own.
//!
//! The bench copies this file into `src/bin/` of each tree it measures and builds it
//! there, so each tree's agents run that tree's agent code.
//!
//!     sdfleet-sim-agents RELEASE_NAMESPACE ROOT RESYNC_SECONDS < node-names

use std::collections::HashMap;
use std::io::BufRead;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().collect();
    let [_, release_ns, root, resync] = args.as_slice() else {
        return Err("usage: sdfleet-sim-agents RELEASE_NAMESPACE ROOT RESYNC_SECONDS < nodes".into());
    };
    let resync = Duration::from_secs(resync.parse()?);
    let nodes: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let base = kube::Config::infer().await?;
    let mut agents = Vec::new();
    for node in &nodes {
        let mut config = base.clone();
        config.auth_info.impersonate = Some(format!("system:serviceaccount:{release_ns}:sdfleet-agent"));
        config.auth_info.impersonate_groups = Some(vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{release_ns}"),
            "system:authenticated".into(),
        ]);
        config.auth_info.impersonate_user_extra = Some(HashMap::from([(
            "authentication.kubernetes.io/node-name".to_string(),
            vec![node.clone()],
        )]));
        let agent = sdfleet::agent::Agent {
            client: kube::Client::try_from(config)?,
            node: node.clone(),
            root: std::path::Path::new(root).join(node),
            region: Some("us-west-2".into()),
        };
        std::fs::create_dir_all(&agent.root)?;
        agents.push(tokio::spawn(async move {
            agent.run(resync, std::future::pending::<()>()).await;
        }));
    }
    eprintln!("{} simulated agents running", agents.len());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
