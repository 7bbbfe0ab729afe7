//! The crate's layers import only downward, and no file imports, through others, back
//! into itself. Reads `src/` as text (no cluster, no build of anything else):
//! `cargo test --test layers -- --nocapture` prints the file-level import graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer, lowest first. A module may import from lower layers and
/// from itself, never from its own layer's other modules or from above.
const LAYERS: &[&[&str]] = &[
    &["latency"],
    &[
        "names",
        "aws",
        "telemetry",
        "leader",
        "mock_apiserver",
        "watch",
    ],
    // The API types: the schema users apply, and nothing of how it is carried out.
    &["crd"],
    // Where models come from: one trait, a backend per source.
    &["storage"],
    &["sync"],
    // The node's CSI plugin: a pod's own ModelSet directory as its volume (its driver
    // name and attribute are what the renderer writes into pods).
    &["csi"],
    &["render"],
    // What a FleetClass allows: the controller decides with it, and each node agent
    // checks again before it reads a bucket.
    &["policy"],
    // The fleet as rendered (class, ModelSet, defaults): the controller and `sdfleet
    // render` decide it with one function.
    &["effective"],
    &["controller", "agent", "gateway", "docs", "image_snapshot"],
    // The binary's subcommands, each with its arguments.
    &["cmd"],
];

fn layer_of(top: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&top))
        .unwrap_or_else(|| panic!("module {top} is in no layer: add it to LAYERS"))
}

/// `src/a/b.rs` → `a::b`; `src/a/mod.rs` → `a`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Expands a `use` tree (`a::{b, c::{d, self}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap().trim().to_string()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(|i| {
            expand(i).into_iter().map(|p| match p.as_str() {
                "self" => prefix.to_string(),
                _ => format!("{prefix}::{p}"),
            })
        })
        .collect()
}

/// Every `crate::`/`super::` path a file names, outside its unit tests.
fn paths_named(text: &str) -> Vec<String> {
    let tests = text.match_indices("#[cfg(test)]\n").find(|(i, m)| {
        let next = text[i + m.len()..].lines().next().unwrap_or_default();
        next.ends_with("mod tests {")
    });
    let code = match tests {
        Some((i, _)) => &text[..i],
        None => text,
    };
    let mut paths = Vec::new();
    for statement in code.split(';') {
        let s = statement.trim_start();
        let s = s.strip_prefix("pub ").unwrap_or(s);
        if let Some(tree) = s.strip_prefix("use ") {
            paths.extend(expand(tree));
        }
    }
    // Paths written inline, e.g. `crate::sync::human(..)` or `super::demand::Demand`.
    for prefix in ["crate::", "super::"] {
        for (i, _) in code.match_indices(prefix) {
            // `super::` inside `super::super::` or a longer word is found from its start.
            let inside_word = code[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            if inside_word {
                continue;
            }
            let rest: String = code[i..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let path = rest.trim_end_matches(':');
            // `use super::{a, b}` names its modules in the tree, read above.
            if path.split("::").all(|s| s == "super" || s == "crate") {
                continue;
            }
            paths.push(path.to_string());
        }
    }
    paths
}

/// The module file a path lands in: the longest prefix that is a module.
fn resolve(from: &[String], path: &str, modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    let mut segments: Vec<&str> = path.split("::").map(str::trim).collect();
    let mut base: Vec<String> = match segments.first().copied() {
        Some("crate") => {
            segments.remove(0);
            Vec::new()
        }
        Some("super") => {
            let mut b = from.to_vec();
            while segments.first() == Some(&"super") {
                segments.remove(0);
                b.pop();
            }
            b
        }
        Some("self") => {
            segments.remove(0);
            from.to_vec()
        }
        _ => return None,
    };
    let mut best = base.clone();
    for s in segments {
        base.push(s.to_string());
        if modules.contains(&base) {
            best = base.clone();
        } else {
            break;
        }
    }
    Some(best)
}

fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| !f.ends_with("main.rs"));
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let targets: BTreeSet<Vec<String>> = paths_named(&text)
            .iter()
            .filter_map(|p| resolve(&from, p, &modules))
            .filter(|t| t != &from && !t.is_empty())
            .collect();
        graph.insert(from, targets);
    }
    graph
}

fn name(m: &[String]) -> String {
    m.join("::")
}

#[test]
fn layers_import_only_downward() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (from, targets) in &graph {
        if from.is_empty() {
            continue;
        }
        for to in targets {
            println!("{} -> {}", name(from), name(to));
            if from[0] == to[0] {
                continue;
            }
            let (lf, lt) = (layer_of(&from[0]), layer_of(&to[0]));
            if lt >= lf {
                wrong.push(format!("{} -> {}", name(from), name(to)));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers: {wrong:#?}");
}

#[test]
fn no_file_imports_back_into_itself() {
    let graph = graph();
    // Depth-first search for a cycle, reporting the first one found.
    fn visit(
        node: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            return Some(stack[i..].iter().chain([node]).map(|m| name(m)).collect());
        }
        if !done.insert(node.clone()) {
            return None;
        }
        stack.push(node.clone());
        // A module's own mod.rs declares its children; only `use` edges count here.
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_checker_sees_use_trees_and_inline_paths() {
    let paths = paths_named(
        "use super::{a::{self, B}, c};\nuse crate::x::y as z;\nfn f() { crate::p::q(); super::r::S::new(); super::super::k(); }\n#[cfg(test)]\nmod tests {\n    use crate::t;\n}",
    );
    assert_eq!(
        paths,
        [
            "super::a",
            "super::a::B",
            "super::c",
            "crate::x::y",
            "crate::x::y",
            "crate::p::q",
            "super::r::S::new",
            "super::super::k"
        ]
    );
}

/// What a group of modules may import besides itself: (the group's path prefix, the
/// top-level modules it may name, why).
const NARROW: &[(&str, &[&str], &str)] = &[(
    "crd",
    &["names"],
    "the API types are a leaf: the schema users apply, not how it is carried out",
)];

/// Modules kept apart inside a layer: (modules, what none of them may import, why).
const APART: &[(&[&str], &[&str], &str)] = &[
    (
        &["sync"],
        &["storage::s3"],
        "the sync engine reads every backend through the ObjectStore trait",
    ),
    (
        &["controller::runtime"],
        &[
            "controller::fleet",
            "controller::modelset",
            "controller::preflight",
        ],
        "the runtime serves every reconciler and names none",
    ),
    (
        // The gateway's core: jobs, their lifecycle and store, placement, the pods.
        &[
            "gateway::engine",
            "gateway::job",
            "gateway::lifecycle",
            "gateway::store",
            "gateway::placement",
            "gateway::comfy",
            "gateway::outputs",
            "gateway::webhook",
            "gateway::workflow",
            "gateway::metrics",
            "gateway::demand",
        ],
        // Its HTTP layer, and its cluster layer.
        &[
            "gateway::api",
            "gateway::auth",
            "gateway::discovery",
            "gateway::fleet_status",
        ],
        "the gateway's core runs jobs without knowing who asks (HTTP) or where pods come from (the cluster)",
    ),
];

/// Whether module `m` is `prefix` or inside it.
fn within(m: &[String], prefix: &str) -> bool {
    let p: Vec<&str> = prefix.split("::").collect();
    m.len() >= p.len() && m.iter().zip(&p).all(|(a, b)| a == b)
}

#[test]
fn narrow_modules_import_only_what_they_may() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (prefix, allowed, why) in NARROW {
        for (from, targets) in &graph {
            if !within(from, prefix) {
                continue;
            }
            for to in targets {
                if !within(to, prefix) && !allowed.contains(&to[0].as_str()) {
                    wrong.push(format!("{} -> {} ({why})", name(from), name(to)));
                }
            }
        }
    }
    for (group, apart, why) in APART {
        for (from, targets) in &graph {
            if !group.iter().any(|g| within(from, g)) {
                continue;
            }
            for to in targets {
                if apart.iter().any(|a| within(to, a)) {
                    wrong.push(format!("{} -> {} ({why})", name(from), name(to)));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports a narrow module may not make: {wrong:#?}"
    );
}
