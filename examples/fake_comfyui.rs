//! The tests' ComfyUI double (tests/support/fake_comfyui.rs) as a server binary, for the
//! `localhost/comfyui-double:dev` image (scripts/image.sh): pods of a fleet on the testbed
//! run it where a GPU node would run ComfyUI. An example target, so the double stays test
//! code and nothing of it enters the product's `src/`.
//!
//! Its defaults are where the operator's rendered Deployment puts things
//! (src/render/deployment.rs): it takes ComfyUI's own `--listen HOST --port PORT` (the
//! container's args), reads model files under `/app/ComfyUI/models` (the read-only
//! ModelSet mount; rescanned every 2 s, as ComfyUI notices new files) and writes outputs to
//! `/app/ComfyUI/output` (the outputs volume, or the image's world-writable directory).
//! Other ComfyUI flags (`--highvram`, ...) are accepted and ignored, so a fleet's `args`
//! work unchanged. Exits on SIGTERM or SIGINT: as a pod's PID 1 it has no default action.
//!
//! `cargo run --example fake_comfyui -- --listen 127.0.0.1 --port 8188 --models DIR
//! --output-directory DIR [--step-time-ms 50] [--switch-penalty-ms 500] [--name POD]`
//!
//! ComfyUI's own flags it honours: `--input-directory DIR`, `--temp-directory DIR` (temp
//! files go to `DIR/temp`, as ComfyUI puts them), `--preview-method none|auto|latent2rgb|taesd`
//! (binary preview frames unless `none`, ComfyUI's default), `--cache-none` (no cache across
//! prompts; `--cache-classic` is the default).
//!
//! The double's own: `--comfyui-version V` (what `/system_stats` reports),
//! `--interrupt-generation new|old` (`/interrupt` honours `{"prompt_id"}`, ≥ 0.3.57, or
//! interrupts whatever runs, ≤ 0.3.56), `--strict-model-inputs` (model nodes refuse missing
//! inputs); faults: `--fail-class CLASS`, `--slow-start-ms MS` (before a prompt's first
//! event), `--hang` (every prompt's first node runs until interrupted), `--refuse-prompts N`
//! (the next N `POST /prompt` answer 503), `--blackhole-after-ms MS` (then every connection
//! goes silent and new ones are never answered: a node that stopped answering).

#[path = "../tests/support/fake_comfyui.rs"]
#[allow(dead_code)]
mod fake_comfyui;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fake_comfyui::{FakeComfy, FakeConfig, Faults, InterruptGeneration, Options};

/// The double names its input folders and unnamed prompts with this (in the tests it is
/// support's).
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

struct Args {
    listen: IpAddr,
    port: u16,
    models: PathBuf,
    output: PathBuf,
    step_time: Duration,
    switch_penalty: Duration,
    name: String,
    faults: Faults,
    options: Options,
    blackhole_after: Option<Duration>,
}

fn parse_args(raw: impl Iterator<Item = String>) -> Args {
    let mut args = Args {
        listen: IpAddr::from([127, 0, 0, 1]),
        port: 8188,
        models: PathBuf::from("/app/ComfyUI/models"),
        output: PathBuf::from("/app/ComfyUI/output"),
        step_time: Duration::from_millis(50),
        switch_penalty: Duration::from_millis(500),
        // A pod's hostname is its name: the double puts it in its outputs and stats.
        name: std::env::var("HOSTNAME").unwrap_or_else(|_| "comfyui-double".into()),
        faults: Faults::default(),
        // ComfyUI's defaults: no previews (`--preview-method none`), the classic cache.
        options: Options {
            previews: false,
            ..Options::default()
        },
        blackhole_after: None,
    };
    let mut raw = raw.peekable();
    let ms = |v: String| Duration::from_millis(v.parse().expect("milliseconds"));
    while let Some(flag) = raw.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (flag, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| raw.next_if(|v| !v.starts_with("--")))
        };
        match flag.as_str() {
            // ComfyUI's `--listen` alone means every address; a list binds its first here.
            "--listen" => {
                let v = value().unwrap_or_else(|| "0.0.0.0".into());
                let first = v.split(',').next().unwrap_or_default();
                args.listen = first.parse().expect("--listen takes an IP address");
            }
            "--port" => args.port = value().expect("--port").parse().expect("--port"),
            "--models" => args.models = value().expect("--models").into(),
            "--output-directory" | "--output" => {
                args.output = value().expect("--output-directory").into()
            }
            "--step-time-ms" => args.step_time = ms(value().expect("--step-time-ms")),
            "--switch-penalty-ms" => {
                args.switch_penalty = ms(value().expect("--switch-penalty-ms"))
            }
            "--name" => args.name = value().expect("--name"),
            "--fail-class" => args.faults.fail_class = value(),
            "--slow-start-ms" => args.faults.slow_start = ms(value().expect("--slow-start-ms")),
            "--hang" => args.faults.hang = true,
            "--refuse-prompts" => {
                args.faults.refuse_prompts = value()
                    .expect("--refuse-prompts")
                    .parse()
                    .expect("--refuse-prompts takes a count")
            }
            "--blackhole-after-ms" => {
                args.blackhole_after = Some(ms(value().expect("--blackhole-after-ms")))
            }
            "--comfyui-version" => args.options.comfyui_version = value(),
            "--interrupt-generation" => {
                args.options.interrupt_generation = match value().as_deref() {
                    Some("old") => InterruptGeneration::Old,
                    Some("new") => InterruptGeneration::New,
                    other => panic!("--interrupt-generation takes old or new, not {other:?}"),
                }
            }
            "--strict-model-inputs" => args.options.strict_model_inputs = true,
            "--preview-method" => {
                args.options.previews = value().is_some_and(|m| m != "none");
            }
            "--cache-none" => args.options.cache = false,
            "--cache-classic" => args.options.cache = true,
            "--input-directory" => {
                args.options.input_dir = Some(value().expect("--input-directory").into())
            }
            // ComfyUI's temp folder is `temp` inside the one given.
            "--temp-directory" => {
                args.options.temp_dir =
                    Some(PathBuf::from(value().expect("--temp-directory")).join("temp"))
            }
            other => match value() {
                Some(v) => eprintln!("fake_comfyui: ignoring {other} {v}"),
                None => eprintln!("fake_comfyui: ignoring {other}"),
            },
        }
    }
    args
}

/// Model files under `root`, relative to it (`checkpoints/x.safetensors`), as the double
/// checks a prompt's `ckpt_name` and the like; none while `root` is missing.
fn model_files(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // `metadata` follows links: a model may be a link into a shared cache.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => dirs.push(path),
                Ok(_) => {
                    if let Ok(rel) = path.strip_prefix(root) {
                        found.push(rel.to_string_lossy().into_owned());
                    }
                }
                Err(_) => {}
            }
        }
    }
    found.sort();
    found
}

#[tokio::main]
async fn main() {
    let args = parse_args(std::env::args().skip(1));
    let models = model_files(&args.models);
    let config = FakeConfig {
        step_time: args.step_time,
        switch_penalty: args.switch_penalty,
        models: models.clone(),
        output_dir: args.output.clone(),
    };
    let fake = FakeComfy::start_on_with(
        &args.name,
        config,
        args.options.clone(),
        SocketAddr::new(args.listen, args.port),
    )
    .await;
    fake.set_faults(args.faults);
    eprintln!(
        "fake_comfyui {} listening on {} with {} model files from {}, output to {}",
        args.name,
        fake.addr,
        models.len(),
        args.models.display(),
        args.output.display()
    );

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).unwrap();
    let mut int = signal(SignalKind::interrupt()).unwrap();
    let mut rescan = tokio::time::interval(Duration::from_secs(2));
    let mut known = models;
    let blackhole = async {
        match args.blackhole_after {
            Some(after) => tokio::time::sleep(after).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(blackhole);
    let mut dark = false;
    loop {
        tokio::select! {
            _ = &mut blackhole, if !dark => {
                eprintln!("fake_comfyui: going silent (blackhole)");
                fake.blackhole();
                dark = true;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = rescan.tick() => {
                let now = model_files(&args.models);
                if now != known {
                    eprintln!("fake_comfyui: {} model files now", now.len());
                    fake.set_models(now.clone());
                    known = now;
                }
            }
        }
    }
    eprintln!("fake_comfyui: stopping");
    drop(fake);
}
