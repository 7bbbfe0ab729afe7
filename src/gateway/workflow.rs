//! Pure functions over ComfyUI's API-format prompt (`{node_id: {class_type, inputs}}`):
//! which models it loads, its save prefixes per job, per-node overrides, input names, and
//! the file references a client may not make.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// Model-loading inputs of ComfyUI's loader nodes, and the model folders each may name a
/// file in (relative to `models/`, as a ModelSet's keys are).
const MODEL_INPUTS: &[(&str, &[&str])] = &[
    ("ckpt_name", &["checkpoints"]),
    ("lora_name", &["loras"]),
    ("vae_name", &["vae"]),
    ("unet_name", &["unet", "diffusion_models"]),
    ("clip_name", &["clip", "text_encoders", "clip_vision"]),
    ("clip_name1", &["clip", "text_encoders"]),
    ("clip_name2", &["clip", "text_encoders"]),
    ("clip_name3", &["clip", "text_encoders"]),
    ("control_net_name", &["controlnet"]),
    ("upscale_model_name", &["upscale_models"]),
    ("style_model_name", &["style_models"]),
    ("gligen_name", &["gligen"]),
    ("hypernetwork_name", &["hypernetworks"]),
];

/// A model file a workflow names: the node, the input and the file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModelRef {
    pub node: String,
    pub input: String,
    pub name: String,
}

impl ModelRef {
    /// The catalog keys (relative to the models directory) that would satisfy it.
    pub fn candidate_keys(&self) -> Vec<String> {
        let folders = MODEL_INPUTS
            .iter()
            .find(|(input, _)| *input == self.input)
            .map(|(_, f)| *f)
            .unwrap_or(&[]);
        folders
            .iter()
            .map(|f| format!("{f}/{}", self.name))
            .collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkflowError {
    #[error("the prompt must be an object of nodes keyed by id (ComfyUI's API format)")]
    NotAnObject,
    #[error("node {0:?} has no class_type: export the workflow with \"Save (API)\"")]
    NoClassType(String),
    #[error("override for node {0:?}: no such node in the workflow")]
    NoSuchNode(String),
    #[error("override for node {0:?} must be an object of input values")]
    BadOverride(String),
}

/// A string input that would make a pod read a file outside the job's own inputs.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("node {node:?}, input {input:?}: {reason}")]
pub struct ForbiddenReference {
    pub node: String,
    pub input: String,
    pub reason: &'static str,
}

/// ComfyUI's annotations that point a file name at a directory other than `input/`
/// (`folder_paths.annotated_filepath` tests `endswith("[output]")`, without the space).
const OTHER_DIRS: &[&str] = &["[output]", "[temp]"];

/// Why `value` may not reach a pod, if it may not: an annotation naming the output or
/// temp directory (every job's files, and the server's), a `..` path segment, or an
/// absolute path. Text with `..` inside a word passes: only a whole segment climbs.
pub fn forbidden_path(value: &str) -> Option<&'static str> {
    let trimmed = value.trim_end();
    if OTHER_DIRS.iter().any(|a| trimmed.ends_with(a)) {
        return Some(
            "names a file in ComfyUI's output or temp directory (` [output]`, ` [temp]`): only the job's own inputs may be loaded",
        );
    }
    // ComfyUI strips an `[input]` annotation before it joins the name to `input/`.
    let path = trimmed
        .strip_suffix("[input]")
        .map_or(trimmed, str::trim_end);
    if path
        .split(['/', '\\'])
        .any(|segment| segment.trim() == "..")
    {
        return Some("a path may not climb out of its directory (`..`)");
    }
    let bytes = value.as_bytes();
    let drive = bytes.len() >= 3
        && bytes[0].is_ascii_alphabetic()
        && bytes[1] == b':'
        && matches!(bytes[2], b'/' | b'\\');
    if value.starts_with(['/', '\\']) || drive {
        return Some("an absolute path is not allowed: name a file of the job's inputs");
    }
    None
}

/// Every literal string input is checked with `forbidden_path` (links are arrays, and
/// numbers are no paths). `filename_prefix` is left out: `prefix_outputs` puts it under
/// the job's own folder with its `.` and `..` segments and leading `/` dropped.
pub fn check_references(prompt: &Value) -> Result<(), ForbiddenReference> {
    for (id, inputs) in nodes(prompt) {
        for (input, value) in inputs {
            if input == "filename_prefix" {
                continue;
            }
            if let Some(reason) = value.as_str().and_then(forbidden_path) {
                return Err(ForbiddenReference {
                    node: id.clone(),
                    input: input.clone(),
                    reason,
                });
            }
        }
    }
    Ok(())
}

/// Why a job's input file name is refused, if it is: it becomes a file name in the
/// pod's `input/` directory, so it must be one plain name there.
pub fn input_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("the name is empty")
    } else if name.len() > 255 {
        Some("the name is longer than 255 bytes")
    } else if name.contains(['/', '\\']) {
        Some("the name may not contain `/` or `\\`")
    } else if name.starts_with('.') {
        // Covers `.` and `..`, and hidden files a node might treat specially.
        Some("the name may not start with a dot")
    } else if name.chars().any(char::is_control) {
        Some("the name may not contain control characters")
    } else {
        None
    }
}

/// Checks the shape ComfyUI's `/prompt` needs, so a bad body is a 400 at submit.
pub fn validate(prompt: &Value) -> Result<(), WorkflowError> {
    let nodes = prompt.as_object().ok_or(WorkflowError::NotAnObject)?;
    if nodes.is_empty() {
        return Err(WorkflowError::NotAnObject);
    }
    for (id, node) in nodes {
        if node.get("class_type").and_then(Value::as_str).is_none() {
            return Err(WorkflowError::NoClassType(id.clone()));
        }
    }
    Ok(())
}

fn nodes(prompt: &Value) -> impl Iterator<Item = (&String, &Map<String, Value>)> {
    prompt
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(id, node)| Some((id, node.get("inputs")?.as_object()?)))
}

fn nodes_mut(prompt: &mut Value) -> impl Iterator<Item = (&String, &mut Map<String, Value>)> {
    prompt
        .as_object_mut()
        .into_iter()
        .flatten()
        .filter_map(|(id, node)| Some((id, node.get_mut("inputs")?.as_object_mut()?)))
}

/// Every model file the workflow loads (literal values only: a linked input is not a name).
pub fn model_refs(prompt: &Value) -> Vec<ModelRef> {
    let mut refs = BTreeSet::new();
    for (id, inputs) in nodes(prompt) {
        for (input, _) in MODEL_INPUTS {
            if let Some(name) = inputs.get(*input).and_then(Value::as_str) {
                refs.insert(ModelRef {
                    node: id.clone(),
                    input: input.to_string(),
                    name: name.to_string(),
                });
            }
        }
    }
    refs.into_iter().collect()
}

/// The checkpoint (or diffusion model) the workflow runs on: what a pod keeps loaded.
pub fn checkpoint(prompt: &Value) -> Option<String> {
    let refs = model_refs(prompt);
    ["ckpt_name", "unet_name"]
        .iter()
        .find_map(|input| refs.iter().find(|r| r.input == *input))
        .map(|r| r.name.clone())
}

/// The refs no key of `catalog` satisfies.
pub fn missing_models(refs: &[ModelRef], has_key: impl Fn(&str) -> bool) -> Vec<ModelRef> {
    refs.iter()
        .filter(|r| !r.candidate_keys().iter().any(|k| has_key(k)))
        .cloned()
        .collect()
}

/// Puts every save node's files under `<job_id>/`: ComfyUI picks a file counter by
/// listing its directory, so pods sharing one output prefix would otherwise overwrite
/// each other's files.
pub fn prefix_outputs(prompt: &mut Value, job_id: &str) {
    for (_, inputs) in nodes_mut(prompt) {
        if let Some(Value::String(prefix)) = inputs.get("filename_prefix") {
            let own = prefix
                .split('/')
                .filter(|part| !part.is_empty() && *part != "." && *part != "..")
                .collect::<Vec<_>>()
                .join("/");
            let own = if own.is_empty() {
                "ComfyUI".into()
            } else {
                own
            };
            inputs.insert(
                "filename_prefix".into(),
                Value::String(format!("{job_id}/{own}")),
            );
        }
    }
}

/// Applies `{node_id: {input: value}}` to a stored workflow.
pub fn apply_overrides(
    prompt: &mut Value,
    overrides: &Map<String, Value>,
) -> Result<(), WorkflowError> {
    for (node, values) in overrides {
        let values = values
            .as_object()
            .ok_or_else(|| WorkflowError::BadOverride(node.clone()))?;
        let inputs = prompt
            .get_mut(node)
            .and_then(|n| n.get_mut("inputs"))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| WorkflowError::NoSuchNode(node.clone()))?;
        for (k, v) in values {
            inputs.insert(k.clone(), v.clone());
        }
    }
    Ok(())
}

/// Replaces every literal input equal to `from` by `to` (an uploaded file's real name:
/// ComfyUI renames on a collision).
pub fn rename_input(prompt: &mut Value, from: &str, to: &str) {
    if from == to {
        return;
    }
    for (_, inputs) in nodes_mut(prompt) {
        for value in inputs.values_mut() {
            if value.as_str() == Some(from) {
                *value = Value::String(to.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sdxl() -> Value {
        json!({
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
            "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "style.safetensors", "model": ["4", 0]}},
            "11": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "../out/ComfyUI", "images": ["8", 0]}},
        })
    }

    #[test]
    fn finds_models_and_the_checkpoint() {
        let refs = model_refs(&sdxl());
        let names: Vec<_> = refs
            .iter()
            .map(|r| (r.input.as_str(), r.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("lora_name", "style.safetensors"),
                ("ckpt_name", "sd_xl_base_1.0.safetensors")
            ]
        );
        assert_eq!(
            checkpoint(&sdxl()).as_deref(),
            Some("sd_xl_base_1.0.safetensors")
        );
    }

    #[test]
    fn missing_models_are_those_in_no_candidate_folder() {
        let refs = model_refs(&sdxl());
        let catalog = [
            "checkpoints/sd_xl_base_1.0.safetensors",
            "loras/other.safetensors",
        ];
        let missing = missing_models(&refs, |k| catalog.contains(&k));
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].name, "style.safetensors");
        assert_eq!(missing[0].node, "10");
    }

    #[test]
    fn save_prefixes_go_under_the_job_and_cannot_climb_out() {
        let mut p = sdxl();
        prefix_outputs(&mut p, "job-1");
        assert_eq!(p["9"]["inputs"]["filename_prefix"], "job-1/out/ComfyUI");
        let mut p = json!({"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "/"}}});
        prefix_outputs(&mut p, "j");
        assert_eq!(p["1"]["inputs"]["filename_prefix"], "j/ComfyUI");
    }

    #[test]
    fn overrides_and_renamed_inputs() {
        let mut p = sdxl();
        let overrides = json!({"4": {"ckpt_name": "other.safetensors"}});
        apply_overrides(&mut p, overrides.as_object().unwrap()).unwrap();
        assert_eq!(p["4"]["inputs"]["ckpt_name"], "other.safetensors");
        let bad = json!({"99": {"x": 1}});
        assert_eq!(
            apply_overrides(&mut p, bad.as_object().unwrap()),
            Err(WorkflowError::NoSuchNode("99".into()))
        );
        rename_input(&mut p, "photo.png", "photo (1).png");
        assert_eq!(p["11"]["inputs"]["image"], "photo (1).png");
    }

    #[test]
    fn references_to_other_directories_and_paths_out_are_refused() {
        for bad in [
            "abc/x.png [output]",
            "x.png[output]",
            "x.png [temp]",
            "x.png [output]  ",
            "../../etc/passwd",
            "a/../b.png",
            "a\\..\\b.png",
            "..",
            "sub/..[input]",
            "/etc/passwd",
            "\\\\server\\share\\x.png",
            "C:\\Windows\\x.png",
            "c:/x.png",
        ] {
            assert!(forbidden_path(bad).is_some(), "{bad:?} passed");
        }
        for good in [
            "photo.png",
            "photo.png [input]",
            "sub/photo.png [input]",
            "wait.. what",
            "a lighthouse... at dusk",
            "..x.png",
            "x..png",
            "A: a cat",
            "50/50",
        ] {
            assert_eq!(forbidden_path(good), None, "{good:?} refused");
        }
    }

    #[test]
    fn the_refusal_names_the_node_and_input_and_skips_links_and_prefixes() {
        let mut p = sdxl();
        assert_eq!(check_references(&p), Ok(()));
        p["11"]["inputs"]["image"] = json!("abc/x.png [output]");
        let err = check_references(&p).unwrap_err();
        assert_eq!((err.node.as_str(), err.input.as_str()), ("11", "image"));
        assert!(err.to_string().contains("\"11\""), "{err}");
        // Links (arrays) and numbers are not paths; save prefixes are confined elsewhere.
        let p = json!({
            "1": {"class_type": "X", "inputs": {"a": ["..", 0], "b": 3}},
            "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "../out"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "wait.. what"}},
        });
        assert_eq!(check_references(&p), Ok(()));
    }

    #[test]
    fn input_names_are_one_plain_file_name() {
        let long = "a".repeat(256);
        for bad in [
            "",
            "../x.png",
            "a/b.png",
            "a\\b.png",
            ".",
            "..",
            ".hidden.png",
            "x\n.png",
            "x\u{7f}.png",
            long.as_str(),
        ] {
            assert!(input_name_problem(bad).is_some(), "{bad:?} passed");
        }
        for good in [
            "photo.png",
            "photo (1).png",
            "x..png",
            &"a".repeat(255),
            "фото.png",
        ] {
            assert_eq!(input_name_problem(good), None, "{good:?} refused");
        }
    }

    #[test]
    fn validation_names_the_node() {
        assert_eq!(validate(&json!([])), Err(WorkflowError::NotAnObject));
        assert_eq!(
            validate(&json!({"3": {"inputs": {}}})),
            Err(WorkflowError::NoClassType("3".into()))
        );
        assert!(validate(&sdxl()).is_ok());
    }
}
