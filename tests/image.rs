//! The Dockerfile and the offline image agree. The Dockerfile cannot be built here (no
//! Docker engine); scripts/image.sh builds its final stage's image from the cargo build as
//! an OCI layout, and that image is what the testbed runs. So the two are held together:
//! this builds the images with the script, reads the sdfleet image's config and layer
//! from its layout (checking every digest, as containerd's import does), parses the
//! Dockerfile's final stage, and compares user, entrypoint, cmd and labels, and the files
//! the stage puts in place: the copied binary, the CA bundle of the packages it installs,
//! the user its `groupadd`/`useradd` make. Then it runs the binary inside the extracted
//! root as the image's user, and runs the ComfyUI double's image the way the operator's
//! Deployment does (its args, its model and output paths, SIGTERM as a pod's end).
//!
//! No cluster; root, for `chroot` and the layers' owners. The script's tools: tar, gzip,
//! jq, strip, ldd. Anything in the final stage this test does not know how to compare
//! (a new instruction, another package) fails it, rather than passing unchecked.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `cargo`'s temp space for integration tests: the same directory on every run, so the
/// script's warm run (unchanged layers are not compressed again) applies.
fn work_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds both images once per test binary, with the binaries of this build's target
/// directory (the one holding this test's own executable).
fn images_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root: chroot, and the layers' file owners"
        );
        let exe = std::env::current_exe().unwrap();
        // <target>/debug/deps/image-<hash>
        let target = exe.ancestors().nth(3).unwrap().to_path_buf();
        let out = work_dir().join("out");
        run(Command::new(repo_root().join("scripts/image.sh"))
            .arg("--out")
            .arg(&out)
            .env("CARGO_TARGET_DIR", target));
        out
    })
}

/// One image of an OCI layout archive, its blobs checked against their digests.
struct Image {
    annotations: Value,
    config: Value,
    /// The single layer, extracted as root (owners and modes as in the layer).
    rootfs: PathBuf,
}

fn blob(layout: &Path, descriptor: &Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&bytes)), hex, "blob {digest}");
    assert_eq!(
        descriptor["size"].as_u64(),
        Some(bytes.len() as u64),
        "size of {digest}"
    );
    bytes
}

/// Each image opened once per test binary (the tests share its extracted root).
fn open_image(name: &str) -> &'static Image {
    static SDFLEET: OnceLock<Image> = OnceLock::new();
    static DOUBLE: OnceLock<Image> = OnceLock::new();
    let cell = match name {
        "sdfleet" => &SDFLEET,
        "comfyui-double" => &DOUBLE,
        other => panic!("no image {other}"),
    };
    cell.get_or_init(|| extract(name))
}

fn extract(name: &str) -> Image {
    let archive = images_dir().join(format!("{name}.oci.tar"));
    let dir = work_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    let read_json = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).unwrap();
    assert_eq!(
        read_json(&std::fs::read(layout.join("oci-layout")).unwrap())["imageLayoutVersion"],
        "1.0.0"
    );
    let index = read_json(&std::fs::read(layout.join("index.json")).unwrap());
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    let manifest = read_json(&blob(&layout, &manifests[0]));
    let config = read_json(&blob(&layout, &manifest["config"]));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    let layer = blob(&layout, &layers[0]);
    // The config names the layer by its uncompressed digest.
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&layer[..])
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!([format!("sha256:{}", hex::encode(Sha256::digest(&tar)))])
    );
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let layer_file = dir.join("layer.tar");
    std::fs::write(&layer_file, &tar).unwrap();
    run(Command::new("tar")
        .args(["--numeric-owner", "-xpf"])
        .arg(&layer_file)
        .arg("-C")
        .arg(&rootfs));
    std::fs::remove_file(&layer_file).unwrap();
    std::fs::remove_dir_all(&layout).unwrap();
    Image {
        annotations: manifests[0]["annotations"].clone(),
        config,
        rootfs,
    }
}

/// What the Dockerfile's last stage (its last `FROM` to the end) sets.
#[derive(Default, Debug)]
struct FinalStage {
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    labels: BTreeMap<String, String>,
    /// COPY destinations.
    copied: Vec<String>,
    /// Each RUN, split at `&&`.
    commands: Vec<Vec<String>>,
}

/// Words as the shell splits them, double quotes kept together (no escapes: none used).
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut any) = (false, false);
    for c in text.chars() {
        match c {
            '"' => (quoted, any) = (!quoted, true),
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut word));
                }
                any = false;
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(word);
    }
    out
}

fn parse_final_stage(dockerfile: &str) -> FinalStage {
    // Continuation lines joined, comments dropped (also those inside a continuation).
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => current = current + head + " ",
            None => instructions.push(std::mem::take(&mut current) + trimmed),
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|i| i.to_uppercase().starts_with("FROM "))
        .expect("a FROM");
    let mut stage = FinalStage::default();
    let exec_form = |args: &str| -> Vec<String> {
        serde_json::from_str(args).unwrap_or_else(|e| panic!("exec form expected: {args}: {e}"))
    };
    for instruction in &instructions[last_from + 1..] {
        let (keyword, args) = instruction.split_once(' ').unwrap();
        let args = args.trim();
        match keyword.to_uppercase().as_str() {
            "USER" => stage.user = args.to_string(),
            "ENTRYPOINT" => stage.entrypoint = exec_form(args),
            "CMD" => stage.cmd = exec_form(args),
            "LABEL" => {
                for pair in words(args) {
                    let (k, v) = pair.split_once('=').unwrap();
                    stage.labels.insert(k.to_string(), v.to_string());
                }
            }
            "COPY" => stage.copied.push(words(args).pop().unwrap()),
            "RUN" => stage
                .commands
                .extend(args.split("&&").map(words).filter(|w| !w.is_empty())),
            other => panic!(
                "{other} in the Dockerfile's final stage: neither scripts/image.sh nor this test knows it; teach both"
            ),
        }
    }
    stage
}

/// `--flag value` pairs and the words that are no flag's value.
fn flags(command: &[String], valued: &[&str]) -> (BTreeMap<String, String>, Vec<String>) {
    let (mut map, mut positional) = (BTreeMap::new(), Vec::new());
    let mut it = command.iter().skip(1);
    while let Some(w) = it.next() {
        if valued.contains(&w.as_str()) {
            map.insert(w.clone(), it.next().unwrap().clone());
        } else if w.starts_with('-') {
            map.insert(w.clone(), String::new());
        } else {
            positional.push(w.clone());
        }
    }
    (map, positional)
}

/// The passwd and group lines `groupadd`/`useradd` write for the final stage's user,
/// with useradd's defaults where the Dockerfile gives no flag.
fn expected_account(stage: &FinalStage) -> (String, Option<String>) {
    let find = |tool: &str| stage.commands.iter().find(|c| c[0] == tool);
    let useradd = find("useradd").expect("the final stage makes its user with useradd");
    let (u, names) = flags(
        useradd,
        &[
            "--uid",
            "-u",
            "--gid",
            "-g",
            "--home-dir",
            "-d",
            "--shell",
            "-s",
        ],
    );
    let name = names.last().expect("useradd's user name").clone();
    let get = |long: &str, short: &str| u.get(long).or_else(|| u.get(short)).cloned();
    let uid = get("--uid", "-u").expect("useradd --uid");
    let gid = get("--gid", "-g").unwrap_or_else(|| {
        panic!("useradd without --gid: its group gets the next free gid, not the USER's")
    });
    let home = get("--home-dir", "-d").unwrap_or_else(|| format!("/home/{name}"));
    let shell = get("--shell", "-s").unwrap_or_else(|| "/bin/sh".into());
    let passwd = format!("{name}:x:{uid}:{gid}::{home}:{shell}");
    let group = find("groupadd").map(|g| {
        let (f, names) = flags(g, &["--gid", "-g"]);
        let gid = f
            .get("--gid")
            .or_else(|| f.get("-g"))
            .expect("groupadd --gid");
        format!("{}:x:{gid}:", names.last().unwrap())
    });
    (passwd, group)
}

fn packages_installed(stage: &FinalStage) -> Vec<String> {
    stage
        .commands
        .iter()
        .filter(|c| c.len() > 2 && c[0] == "apt-get" && c.contains(&"install".to_string()))
        .flat_map(|c| {
            c.iter()
                .skip(2)
                .filter(|w| !w.starts_with('-') && *w != "install")
        })
        .cloned()
        .collect()
}

fn dockerfile_stage() -> FinalStage {
    parse_final_stage(&std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap())
}

fn string_list(v: &Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap_or_else(|_| panic!("a list of strings: {v}"))
}

#[test]
fn the_dockerfile_parser_reads_continuations_quotes_and_run_commands() {
    let stage = parse_final_stage(
        "FROM a AS build\nUSER 1\nFROM b\n# note\nLABEL x=\"a b\" \\\n      y=c\n\
         RUN apt-get install -y --no-install-recommends p q \\\n    && useradd --uid 7 u\n\
         COPY --from=build /x /usr/bin/x\nUSER 7:7\nCMD [\"c\"]\n",
    );
    assert_eq!(stage.user, "7:7");
    assert_eq!(stage.cmd, ["c"]);
    assert_eq!(
        stage.labels,
        BTreeMap::from([("x".into(), "a b".into()), ("y".into(), "c".into())])
    );
    assert_eq!(stage.copied, ["/usr/bin/x"]);
    assert_eq!(packages_installed(&stage), ["p", "q"]);
    assert_eq!(stage.commands[1], ["useradd", "--uid", "7", "u"]);
}

#[test]
fn the_sdfleet_image_has_the_dockerfiles_user_entrypoint_cmd_and_labels() {
    let stage = dockerfile_stage();
    let image = open_image("sdfleet");
    assert_eq!(
        image.annotations["org.opencontainers.image.ref.name"],
        "localhost/sdfleet:dev"
    );
    let config = &image.config["config"];
    assert_eq!(config["User"], stage.user, "USER");
    assert_eq!(
        string_list(&config["Entrypoint"]),
        stage.entrypoint,
        "ENTRYPOINT"
    );
    assert_eq!(string_list(&config["Cmd"]), stage.cmd, "CMD");
    let labels: BTreeMap<String, String> =
        serde_json::from_value(config["Labels"].clone()).unwrap();
    assert_eq!(labels, stage.labels, "LABEL");
    // The script takes the version from Cargo.toml; the Dockerfile states it.
    assert_eq!(
        stage
            .labels
            .get("org.opencontainers.image.version")
            .map(String::as_str),
        Some(env!("CARGO_PKG_VERSION")),
        "the Dockerfile's version label is Cargo.toml's version"
    );
}

#[test]
fn the_sdfleet_image_has_the_files_the_dockerfile_puts_there() {
    let stage = dockerfile_stage();
    let image = open_image("sdfleet");
    let root = &image.rootfs;
    assert!(!stage.copied.is_empty());
    for dest in &stage.copied {
        let meta = std::fs::metadata(root.join(dest.trim_start_matches('/')))
            .unwrap_or_else(|e| panic!("COPY destination {dest} in the image: {e}"));
        assert!(
            meta.is_file() && meta.permissions().mode() & 0o111 != 0,
            "{dest}"
        );
        // COPY without --chown: root's.
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{dest}");
    }
    for package in packages_installed(&stage) {
        match package.as_str() {
            "ca-certificates" => {
                let bundle =
                    std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt"))
                        .expect("the CA bundle in the image");
                assert!(bundle.contains("-----BEGIN CERTIFICATE-----"));
            }
            other => panic!(
                "the Dockerfile installs {other}: scripts/image.sh puts nothing of it in the image"
            ),
        }
    }
    let (passwd, group) = expected_account(&stage);
    let lines = |file: &str| -> Vec<String> {
        std::fs::read_to_string(root.join(file))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert!(
        lines("etc/passwd").contains(&passwd),
        "{passwd} in {:?}",
        lines("etc/passwd")
    );
    if let Some(group) = &group {
        assert!(
            lines("etc/group").contains(group),
            "{group} in {:?}",
            lines("etc/group")
        );
    }
    // USER's uid:gid is that account (a process of it resolves to its name and group).
    let fields: Vec<&str> = passwd.split(':').collect();
    assert_eq!(
        stage.user,
        format!("{}:{}", fields[2], fields[3]),
        "USER is the useradd account's uid:gid"
    );
    assert!(
        !root.join(fields[5].trim_start_matches('/')).exists(),
        "--no-create-home"
    );
}

#[test]
fn the_sdfleet_binary_runs_in_its_image_as_the_images_user() {
    let image = open_image("sdfleet");
    let user = image.config["config"]["User"].as_str().unwrap().to_string();
    let entrypoint = string_list(&image.config["config"]["Entrypoint"]);
    // Only the image's files: the loader and libraries are the ones it carries.
    let help = run(Command::new("chroot")
        .arg(format!("--userspec={user}"))
        .arg(&image.rootfs)
        .args(&entrypoint)
        .arg("--help"));
    assert!(help.contains("controller"), "{help}");
}

/// Kills the process if a test fails before it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HTTP/1.1 on 127.0.0.1, one request per connection: status and body.
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Polls `f` every 100 ms for up to 10 s.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_comfyui_double_image_serves_where_the_operators_deployment_expects_comfyui() {
    let image = open_image("comfyui-double");
    assert_eq!(
        image.annotations["org.opencontainers.image.ref.name"],
        "localhost/comfyui-double:dev"
    );
    let config = &image.config["config"];
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["ExposedPorts"], json!({"8188/tcp": {}}));
    let root = &image.rootfs;
    // The ModelSet's files (read-only there) and the outputs volume, at the operator's
    // mount paths (src/render/deployment.rs).
    let models = root.join("app/ComfyUI/models");
    std::fs::create_dir_all(models.join("checkpoints")).unwrap();
    std::fs::write(models.join("checkpoints/here.safetensors"), "").unwrap();
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The container's args as the operator renders them, then a fleet's own ComfyUI flag.
    let mut double = Running(
        Command::new("chroot")
            .arg("--userspec=65532:65532")
            .arg(root)
            .args(string_list(&config["Entrypoint"]))
            .args([
                "--listen",
                "0.0.0.0",
                "--port",
                &port.to_string(),
                "--highvram",
            ])
            .args(["--step-time-ms", "1", "--switch-penalty-ms", "0"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("the startup probe's /system_stats", || {
        http(port, "GET", "/system_stats", "").filter(|(s, _)| *s == 200)
    });
    let prompt = |ckpt: &str, id: &str| {
        json!({"client_id": "image-test", "prompt_id": id, "prompt": {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "KSampler", "inputs": {"steps": 2, "model": ["1", 0]}},
            "4": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "image-test"}},
        }})
        .to_string()
    };
    let (status, body) = http(
        port,
        "POST",
        "/prompt",
        &prompt("missing.safetensors", "p0"),
    )
    .unwrap();
    assert_eq!(status, 400, "a model not under /app/ComfyUI/models: {body}");
    let (status, body) = http(port, "POST", "/prompt", &prompt("here.safetensors", "p1")).unwrap();
    assert_eq!(status, 200, "{body}");
    eventually("p1 in the history", || {
        http(port, "GET", "/history/p1", "").filter(|(_, b)| b.contains("success"))
    });
    let output = root.join("app/ComfyUI/output/image-test_00001_.png");
    assert_eq!(std::fs::metadata(&output).unwrap().uid(), 65532);
    // A model the ModelSet adds later is found, as ComfyUI rescans its folders.
    std::fs::write(models.join("checkpoints/later.safetensors"), "").unwrap();
    eventually("the later model listed", || {
        http(port, "POST", "/prompt", &prompt("later.safetensors", "p2")).filter(|(s, _)| *s == 200)
    });
    // The kubelet stops a pod with SIGTERM; PID 1 has no default action for it, so the
    // double's own handler must end it, with status 0.
    unsafe { libc::kill(double.0.id() as i32, libc::SIGTERM) };
    let status = eventually("exit on SIGTERM", || double.0.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
}
