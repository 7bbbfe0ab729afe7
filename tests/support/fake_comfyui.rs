//! A ComfyUI server for tests, as strict as ComfyUI 0.3.64 (the `Comfy-Org/ComfyUI`
//! snapshot, October 2025) where a client can tell: written from its `server.py`,
//! `execution.py`, `main.py`, `nodes.py`, `folder_paths.py` and `comfy_execution/`, which the
//! comments below cite. There is no GPU here, so model nodes are stand-ins; the model-free
//! nodes (`EmptyImage`, `LoadImage`, `ImageInvert`, `SaveImage`, `PreviewImage`) behave as a
//! real ComfyUI on a CPU does, so a script can diff the two.
//!
//! HTTP (bodies as aiohttp sends them: `json.dumps` formatting, empty 200s and 400s, and
//! aiohttp's 500 text when a handler raises):
//! - `POST /prompt` `{prompt, client_id?, prompt_id?, number?, front?, extra_data?,
//!   partial_execution_targets?}`: `validate_prompt`/`validate_inputs` to the letter:
//!   `no_prompt`, `invalid_prompt` (missing or unknown `class_type`), `prompt_no_outputs`,
//!   `prompt_outputs_failed_validation` with `node_errors` (`required_input_missing`,
//!   `bad_linked_input`, `return_type_mismatch`, `invalid_input_type`,
//!   `value_smaller_than_min`/`value_bigger_than_max`, `value_not_in_list`,
//!   `custom_validation_failed`, `exception_during_(inner_)validation`), a 200 with
//!   `node_errors` when some outputs are good; inputs converted in place (`"512"` → `512`),
//!   as the queue and history then show them. `GET /prompt`.
//! - `GET /queue` (a heap, in `heapq`'s order), `POST /queue {clear, delete}`,
//!   `GET /history[/{id}]` (`max_items`, `offset`), `POST /history {clear, delete}`,
//!   `POST /interrupt` (see below), `POST /free`, `GET /features`, `GET /system_stats`
//!   (`system.comfyui_version`, configurable), `POST /upload/image` (`image_upload`: 400
//!   with an empty body for a missing `image` file part or a file name or `subfolder` that
//!   leaves the folder, 500 for an `image` part that is not a file or an unknown `type`;
//!   `x (1).png` on a collision, the same name for the same bytes), `GET /view`
//!   (`view_image`: 400/403/404 as it checks, `type=temp|output|input`, `[output]`-style
//!   annotations).
//! - `/ws?clientId=`: one socket per client id, as `websocket_handler` keeps them: a new
//!   socket with the same id takes the id's place and the older one is *not closed*, it
//!   just stops receiving; when that older socket later closes, its `finally` pops the id
//!   again, so the newer socket goes deaf too (still open, never sent anything again). On
//!   connect `status` (with `sid`), and `executing` if this id's prompt is mid-node; a
//!   first text message `{"type": "feature_flags", ...}` is answered with the server's flags.
//!   Events of a prompt go to its client only (`send_sync(..., sid)`): `execution_start`,
//!   `execution_cached`, `progress_state`, `executing`, `progress`, `executed`,
//!   `execution_success` / `execution_error` / `execution_interrupted`, then (after
//!   `status`) `executing` with a null node. A prompt without `client_id` sends none of
//!   those except `execution_interrupted`, `progress`, `progress_state` and previews, which
//!   then go to every socket (`sid=None`), as ComfyUI does.
//! - Binary preview frames while a sampler steps (`main.py` `hijack_progress`):
//!   `>I` 1 (`PREVIEW_IMAGE`), `>I` 1 (JPEG), a tiny 8×8 gray JPEG; to a client that sent
//!   `supports_preview_metadata` instead `>I` 4 (`PREVIEW_IMAGE_WITH_METADATA`), `>I`
//!   length, metadata JSON, JPEG. `Options::previews` is ComfyUI's `--preview-method`
//!   (tests default to on; the example binary follows ComfyUI's default, off).
//!
//! Execution (`execution.py`): one prompt at a time from the heap; nodes in
//! `ExecutionList`'s order (outputs and the uncached nodes they need, `ux_friendly_pick_node`),
//! links resolved; the classic cache (`comfy_execution/caching.py`): a node whose class,
//! constant inputs and ancestry (its input signature) match one kept from earlier prompts is
//! not run; `execution_cached` lists those, and a cached *output* node still sends `executed`
//! with its earlier UI output (to the client, if any) and `/history` lists it; entries whose
//! signature the new prompt does not use are dropped (so only consecutive repeats hit).
//! `Options::cache = false` is `--cache-none`. `LoadImage`'s signature includes the file's
//! sha256 (`IS_CHANGED`). `SaveImage` picks its counter from the folder listing
//! (`get_save_image_path`), so pods sharing a folder race as they do; `PreviewImage` writes
//! to this server's temp folder with type `temp` and the prefix `ComfyUI_temp_xxxxx_` (five
//! letters drawn, as ComfyUI does, from "abcdefghijklmnopqrstupvxyz", kept per node id while
//! the id stays in consecutive prompts). Model stand-ins: loaders sleep `switch_penalty` when
//! the checkpoint changes, samplers sleep `step_time` per step.
//!
//! Interrupt: `InterruptGeneration::New` (ComfyUI ≥ 0.3.57: `post_interrupt` reads
//! `{"prompt_id"}` and interrupts only if that prompt runs, or everything without one; added
//! 2025-09-02 by "Accept prompt_id in interrupt handler (#9607)", between 0.3.56 and 0.3.57)
//! and `Old` (≤ 0.3.56: the body is ignored and whatever runs is interrupted); the flag is
//! checked before each node and at each sampler step, and cleared when a prompt starts, so
//! an interrupt with nothing running is lost. `/system_stats` says `0.3.64` or `0.3.56` by
//! generation unless `Options::comfyui_version` says otherwise.
//!
//! Faults: `kill` (the listener and every connection close, as a killed pod), `blackhole`
//! (every open connection, HTTP keep-alive and websocket, goes silent: no data, no close
//! frame, no FIN; new connections are accepted and never answered; nothing runs on — the
//! closest loopback gets to a machine that stopped answering, where even the handshake of a
//! new connection would go unanswered), `drop_websockets` (closes them), `Faults`: a failing
//! node class, a hang (every prompt started while set runs its first node until interrupted),
//! a slow start (a delay before a prompt's first event), refused prompts (503).
//!
//! Where it differs: where ComfyUI iterates a Python set (several outputs' execution and
//! validation order, `node_errors`, `executed`, `current_outputs`, history `outputs`), the
//! order follows Python's string hashing; here it is prompt order (JSON bodies are
//! otherwise in ComfyUI's key order and `json.dumps` format, a client's prompt in its own
//! order); tracebacks are empty lists; `current_inputs` shows tensors (and SaveImage's
//! hidden `prompt`) as short placeholders; a validation cycle raises at its first repeated
//! node, not at Python's recursion limit; outputs are real but tiny solid-colour PNGs
//! (flate2, not PIL: the same pixels, size and `prompt` text chunk, not the same bytes; one
//! more text chunk, `fake_comfyui`, says `fake-image prompt=ID node=N pod=NAME` for tests
//! that check who wrote a file); `LoadImage` reads only the size of PNG/JPEG/GIF/BMP/WebP
//! files and loads mid-grey pixels (other files fail as PIL's `UnidentifiedImageError`);
//! `/view` ignores `preview` and `channel` and sends no ETag; `/upload/mask` is absent and
//! `/object_info` lists only the double's classes; model nodes (checkpoints, CLIP,
//! samplers, VAE, LoRA, UNET) validate their links, numbers and model lists, but accept
//! missing inputs unless `Options::strict_model_inputs` (the tests' workflows leave some
//! out), and their input configs lack most of ComfyUI's tooltips and descriptions; no model
//! is loaded (the penalty stands for it); `system_stats` memory and device figures are
//! constants; a blackholed server still completes TCP handshakes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc, watch};

// ---------------------------------------------------------------------------------------
// Configuration and faults
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct FakeConfig {
    pub step_time: Duration,
    pub switch_penalty: Duration,
    /// Model files it has, relative to `models/` (`checkpoints/x.safetensors`).
    pub models: Vec<String>,
    /// ComfyUI's `output/` (may be shared by several fakes, as an S3 prefix would be).
    pub output_dir: PathBuf,
}

/// Which `POST /interrupt` the server has (see the header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InterruptGeneration {
    /// ComfyUI ≥ 0.3.57: `{"prompt_id"}` interrupts only that prompt, if it runs.
    #[default]
    New,
    /// ComfyUI ≤ 0.3.56: the body is ignored, whatever runs is interrupted.
    Old,
}

/// How the server was started (ComfyUI's command line); `FakeConfig` holds what every test
/// sets.
#[derive(Clone, Debug)]
pub struct Options {
    /// `system.comfyui_version`; `None`: 0.3.64 (`New`) or 0.3.56 (`Old`).
    pub comfyui_version: Option<String>,
    pub interrupt_generation: InterruptGeneration,
    /// Binary preview frames at sampler steps (`--preview-method` other than `none`).
    pub previews: bool,
    /// The classic cache; `false` is `--cache-none` (every prompt runs every node).
    pub cache: bool,
    /// Model stand-ins refuse missing inputs as ComfyUI would.
    pub strict_model_inputs: bool,
    /// `input/` (`--input-directory`); `None`: a fresh folder under the system temp.
    pub input_dir: Option<PathBuf>,
    /// `temp/` (ComfyUI's `--temp-directory X` uses `X/temp`); `None`: a fresh folder.
    pub temp_dir: Option<PathBuf>,
    /// `--max-upload-size` in bytes (ComfyUI's default: 100 MiB): aiohttp's
    /// `client_max_size`, past which a request body is refused with 413.
    pub max_upload_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            comfyui_version: None,
            interrupt_generation: InterruptGeneration::New,
            previews: true,
            cache: true,
            strict_model_inputs: false,
            input_dir: None,
            temp_dir: None,
            max_upload_size: 100 << 20,
        }
    }
}

impl Options {
    fn version(&self) -> String {
        self.comfyui_version
            .clone()
            .unwrap_or_else(|| match self.interrupt_generation {
                InterruptGeneration::New => "0.3.64".into(),
                InterruptGeneration::Old => "0.3.56".into(),
            })
    }
}

#[derive(Default, Clone)]
pub struct Faults {
    /// Every node of this class fails with `execution_error` ("injected failure"); a class
    /// ComfyUI does not have is accepted as one with no declared inputs.
    pub fail_class: Option<String>,
    /// Every prompt started while set runs its first node until interrupted.
    pub hang: bool,
    /// A delay before a started prompt's first event.
    pub slow_start: Duration,
    /// The next this many `POST /prompt` answer 503: a failed hand-off (not a
    /// validation error, which is a 400).
    pub refuse_prompts: usize,
}

// ---------------------------------------------------------------------------------------
// JSON as Python holds it: dicts keep insertion order, ints and floats differ, and
// `json.dumps` writes `", "`/`": "` separators and escapes non-ASCII (aiohttp's
// `json_response` and `send_json` use it).
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum J {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

macro_rules! obj {
    ($($k:expr => $v:expr),* $(,)?) => {
        J::Obj(vec![$(($k.to_string(), Into::<J>::into($v))),*])
    };
}

impl From<&str> for J {
    fn from(s: &str) -> J {
        J::Str(s.to_string())
    }
}
impl From<String> for J {
    fn from(s: String) -> J {
        J::Str(s)
    }
}
impl From<&String> for J {
    fn from(s: &String) -> J {
        J::Str(s.clone())
    }
}
impl From<bool> for J {
    fn from(b: bool) -> J {
        J::Bool(b)
    }
}
impl From<i128> for J {
    fn from(n: i128) -> J {
        J::Int(n)
    }
}
// Integers become Python ints, whatever their width.
macro_rules! int_into_j {
    ($($t:ty),*) => {$(
        impl From<$t> for J {
            fn from(n: $t) -> J {
                J::Int(n as i128)
            }
        }
    )*};
}
int_into_j!(i64, u64, usize, i32);
impl From<f64> for J {
    fn from(f: f64) -> J {
        J::Float(f)
    }
}
impl From<&J> for J {
    fn from(j: &J) -> J {
        j.clone()
    }
}
impl<T: Into<J>> From<Vec<T>> for J {
    fn from(v: Vec<T>) -> J {
        J::Arr(v.into_iter().map(Into::into).collect())
    }
}
impl<T: Into<J>> From<Option<T>> for J {
    fn from(v: Option<T>) -> J {
        v.map(Into::into).unwrap_or(J::Null)
    }
}

impl<'de> serde::Deserialize<'de> for J {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<J, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = J;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<J, E> {
                Ok(J::Null)
            }
            fn visit_none<E>(self) -> Result<J, E> {
                Ok(J::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<J, E> {
                Ok(J::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<J, E> {
                Ok(J::Int(n as i128))
            }
            fn visit_u64<E>(self, n: u64) -> Result<J, E> {
                Ok(J::Int(n as i128))
            }
            fn visit_f64<E>(self, f: f64) -> Result<J, E> {
                Ok(J::Float(f))
            }
            fn visit_str<E>(self, s: &str) -> Result<J, E> {
                Ok(J::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<J, E> {
                Ok(J::Str(s))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<J, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(J::Arr(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<J, A::Error> {
                let mut v: Vec<(String, J)> = Vec::new();
                while let Some((k, x)) = a.next_entry::<String, J>()? {
                    // A repeated key keeps its first place and its last value, as in a dict.
                    match v.iter_mut().find(|(key, _)| *key == k) {
                        Some(e) => e.1 = x,
                        None => v.push((k, x)),
                    }
                }
                Ok(J::Obj(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl J {
    fn parse(bytes: &[u8]) -> Option<J> {
        serde_json::from_slice(bytes).ok()
    }

    fn get(&self, k: &str) -> Option<&J> {
        match self {
            J::Obj(v) => v.iter().find(|(key, _)| key == k).map(|(_, x)| x),
            _ => None,
        }
    }

    fn get_mut(&mut self, k: &str) -> Option<&mut J> {
        match self {
            J::Obj(v) => v.iter_mut().find(|(key, _)| key == k).map(|(_, x)| x),
            _ => None,
        }
    }

    /// `d[k] = x`: an existing key keeps its place.
    fn set(&mut self, k: &str, x: J) {
        if let J::Obj(v) = self {
            match v.iter_mut().find(|(key, _)| key == k) {
                Some(e) => e.1 = x,
                None => v.push((k.to_string(), x)),
            }
        }
    }

    fn remove(&mut self, k: &str) {
        if let J::Obj(v) = self {
            v.retain(|(key, _)| key != k);
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            J::Str(s) => Some(s),
            _ => None,
        }
    }

    fn entries(&self) -> &[(String, J)] {
        match self {
            J::Obj(v) => v,
            _ => &[],
        }
    }

    /// Python's truthiness.
    fn truthy(&self) -> bool {
        match self {
            J::Null => false,
            J::Bool(b) => *b,
            J::Int(n) => *n != 0,
            J::Float(f) => *f != 0.0,
            J::Str(s) => !s.is_empty(),
            J::Arr(v) => !v.is_empty(),
            J::Obj(v) => !v.is_empty(),
        }
    }

    fn num(&self) -> Option<f64> {
        match self {
            J::Bool(b) => Some(*b as i32 as f64),
            J::Int(n) => Some(*n as f64),
            J::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// `json.dumps(self)`.
    fn dump(&self) -> String {
        let mut s = String::new();
        self.write(&mut s);
        s
    }

    fn write(&self, out: &mut String) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Int(n) => out.push_str(&n.to_string()),
            J::Float(f) if f.is_nan() => out.push_str("NaN"),
            J::Float(f) if f.is_infinite() => {
                out.push_str(if *f > 0.0 { "Infinity" } else { "-Infinity" })
            }
            J::Float(f) => out.push_str(&float_repr(*f)),
            J::Str(s) => dump_str(s, out),
            J::Arr(v) => {
                out.push('[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    x.write(out);
                }
                out.push(']');
            }
            J::Obj(v) => {
                out.push('{');
                for (i, (k, x)) in v.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    dump_str(k, out);
                    out.push_str(": ");
                    x.write(out);
                }
                out.push('}');
            }
        }
    }

    fn to_value(&self) -> Value {
        match self {
            J::Null => Value::Null,
            J::Bool(b) => Value::Bool(*b),
            J::Int(n) => i64::try_from(*n)
                .map(Value::from)
                .or_else(|_| u64::try_from(*n).map(Value::from))
                .unwrap_or_else(|_| Value::from(*n as f64)),
            J::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            J::Str(s) => Value::String(s.clone()),
            J::Arr(v) => Value::Array(v.iter().map(J::to_value).collect()),
            J::Obj(v) => Value::Object(v.iter().map(|(k, x)| (k.clone(), x.to_value())).collect()),
        }
    }

    /// `repr(self)`.
    fn repr(&self) -> String {
        match self {
            J::Null => "None".into(),
            J::Bool(b) => if *b { "True" } else { "False" }.into(),
            J::Int(n) => n.to_string(),
            J::Float(f) => float_repr(*f),
            J::Str(s) => str_repr(s),
            J::Arr(v) => format!("[{}]", v.iter().map(J::repr).collect::<Vec<_>>().join(", ")),
            J::Obj(v) => format!(
                "{{{}}}",
                v.iter()
                    .map(|(k, x)| format!("{}: {}", str_repr(k), x.repr()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// `str(self)`.
    fn py_str(&self) -> String {
        match self {
            J::Str(s) => s.clone(),
            other => other.repr(),
        }
    }

    /// Python's type name, for messages.
    fn type_name(&self) -> &'static str {
        match self {
            J::Null => "NoneType",
            J::Bool(_) => "bool",
            J::Int(_) => "int",
            J::Float(_) => "float",
            J::Str(_) => "str",
            J::Arr(_) => "list",
            J::Obj(_) => "dict",
        }
    }

    /// `==` between JSON values as Python compares them (`1 == 1.0 == True`).
    fn py_eq(&self, other: &J) -> bool {
        match (self, other) {
            (J::Null, J::Null) => true,
            (J::Str(a), J::Str(b)) => a == b,
            (J::Arr(a), J::Arr(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.py_eq(y))
            }
            (J::Obj(a), J::Obj(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .all(|(k, x)| other.get(k).is_some_and(|y| x.py_eq(y)))
                    && b.iter().all(|(k, _)| self.get(k).is_some())
            }
            (a, b) => match (a.num(), b.num()) {
                (Some(x), Some(y)) => x == y,
                _ => false,
            },
        }
    }

    /// A text that is equal for values Python's `to_hashable` makes equal (cache keys).
    fn hashable(&self) -> String {
        match self {
            J::Bool(b) => (*b as i32).to_string(),
            J::Float(f) if f.fract() == 0.0 && f.abs() < 1e30 => format!("{}", *f as i128),
            J::Float(f) if f.is_nan() => format!("nan-{}", uuid::Uuid::new_v4()),
            J::Float(f) => float_repr(*f),
            J::Obj(v) => {
                let mut items: Vec<_> = v.iter().collect();
                items.sort_by(|a, b| a.0.cmp(&b.0));
                format!(
                    "{{{}}}",
                    items
                        .iter()
                        .map(|(k, x)| format!("{}:{}", str_repr(k), x.hashable()))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
            J::Arr(v) => format!(
                "[{}]",
                v.iter().map(J::hashable).collect::<Vec<_>>().join(",")
            ),
            other => other.dump(),
        }
    }
}

/// `repr(float)`: the shortest digits that round-trip, positional from 1e-4 to 1e16.
fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let e = format!("{f:e}");
    let (mantissa, exp) = e.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let sign = if mantissa.starts_with('-') { "-" } else { "" };
    let digits: String = mantissa.trim_start_matches('-').replace('.', "");
    let n = digits.len() as i32;
    let body = if (-4..16).contains(&exp) {
        if exp >= 0 {
            if n <= exp + 1 {
                format!("{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
            } else {
                let (a, b) = digits.split_at((exp + 1) as usize);
                format!("{a}.{b}")
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let m = if n > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    };
    format!("{sign}{body}")
}

/// A JSON string with `ensure_ascii`.
fn dump_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// `repr(str)`.
fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::from(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `int(text)`: optional sign, digits with single underscores between them, spaces around.
fn py_int_text(s: &str) -> Option<i128> {
    let t = s.trim();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '_')
    {
        return None;
    }
    let n: i128 = digits.replace('_', "").parse().ok()?;
    Some(if neg { -n } else { n })
}

/// A Python exception: its full type name and `str(ex)`.
#[derive(Clone, Debug)]
struct Exc {
    ty: String,
    msg: String,
}

fn exc(ty: &str, msg: impl Into<String>) -> Exc {
    Exc {
        ty: ty.into(),
        msg: msg.into(),
    }
}

/// `int(x)` for a JSON value.
fn py_int(v: &J) -> Result<J, Exc> {
    match v {
        J::Int(n) => Ok(J::Int(*n)),
        J::Bool(b) => Ok(J::Int(*b as i128)),
        J::Float(f) if f.is_nan() => Err(exc("ValueError", "cannot convert float NaN to integer")),
        J::Float(f) if f.is_infinite() => Err(exc(
            "OverflowError",
            "cannot convert float infinity to integer",
        )),
        J::Float(f) => Ok(J::Int(f.trunc() as i128)),
        J::Str(s) => py_int_text(s).map(J::Int).ok_or_else(|| {
            exc(
                "ValueError",
                format!("invalid literal for int() with base 10: {}", str_repr(s)),
            )
        }),
        other => Err(exc(
            "TypeError",
            format!(
                "int() argument must be a string, a bytes-like object or a real number, not '{}'",
                other.type_name()
            ),
        )),
    }
}

/// `float(x)` for a JSON value.
fn py_float(v: &J) -> Result<J, Exc> {
    match v {
        J::Int(n) => Ok(J::Float(*n as f64)),
        J::Bool(b) => Ok(J::Float(*b as i32 as f64)),
        J::Float(f) => Ok(J::Float(*f)),
        J::Str(s) => {
            let t = s.trim().replace('_', "");
            let lower = t.to_ascii_lowercase();
            let special = match lower.trim_start_matches(['+', '-']) {
                "inf" | "infinity" => Some(f64::INFINITY),
                "nan" => Some(f64::NAN),
                _ => None,
            };
            let parsed = match special {
                Some(x) if lower.starts_with('-') => Some(-x),
                Some(x) => Some(x),
                None if !t.is_empty()
                    && t.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) =>
                {
                    t.parse::<f64>().ok()
                }
                None => None,
            };
            parsed.map(J::Float).ok_or_else(|| {
                exc(
                    "ValueError",
                    format!("could not convert string to float: {}", str_repr(s)),
                )
            })
        }
        other => Err(exc(
            "TypeError",
            format!(
                "float() argument must be a string or a real number, not '{}'",
                other.type_name()
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// posixpath, as ComfyUI's path checks use it
// ---------------------------------------------------------------------------------------

mod posix {
    pub fn normpath(p: &str) -> String {
        if p.is_empty() {
            return ".".into();
        }
        let initial = if p.starts_with("//") && !p.starts_with("///") {
            "//"
        } else if p.starts_with('/') {
            "/"
        } else {
            ""
        };
        let mut comps: Vec<&str> = Vec::new();
        for c in p.split('/') {
            if c.is_empty() || c == "." {
                continue;
            }
            if c != ".." || (initial.is_empty() && comps.is_empty()) || comps.last() == Some(&"..")
            {
                comps.push(c);
            } else if !comps.is_empty() {
                comps.pop();
            }
        }
        let out = format!("{initial}{}", comps.join("/"));
        if out.is_empty() { ".".into() } else { out }
    }

    pub fn join(a: &str, b: &str) -> String {
        if b.starts_with('/') || a.is_empty() {
            b.to_string()
        } else if a.ends_with('/') {
            format!("{a}{b}")
        } else {
            format!("{a}/{b}")
        }
    }

    pub fn abspath(p: &str) -> String {
        if p.starts_with('/') {
            normpath(p)
        } else {
            let cwd = std::env::current_dir().unwrap_or_default();
            normpath(&join(&cwd.to_string_lossy(), p))
        }
    }

    pub fn basename(p: &str) -> &str {
        p.rsplit_once('/').map(|(_, b)| b).unwrap_or(p)
    }

    pub fn dirname(p: &str) -> String {
        let i = p.rfind('/').map(|i| i + 1).unwrap_or(0);
        let head = &p[..i];
        if !head.is_empty() && head.chars().any(|c| c != '/') {
            head.trim_end_matches('/').to_string()
        } else {
            head.to_string()
        }
    }

    pub fn splitext(p: &str) -> (String, String) {
        let sep = p.rfind('/').map(|i| i as isize).unwrap_or(-1);
        // A leading run of dots is part of the name (".bashrc" has no extension).
        if let Some(dot) = p.rfind('.')
            && dot as isize > sep
            && p.as_bytes()[(sep + 1) as usize..dot]
                .iter()
                .any(|b| *b != b'.')
        {
            return (p[..dot].to_string(), p[dot..].to_string());
        }
        (p.to_string(), String::new())
    }

    /// For two absolute paths (`os.path.commonpath` drops empty and `.` parts only).
    pub fn commonpath(a: &str, b: &str) -> String {
        let parts = |p: &str| -> Vec<String> {
            p.split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .map(str::to_string)
                .collect()
        };
        let (pa, pb) = (parts(a), parts(b));
        let (s1, s2) = if pa <= pb { (pa, pb) } else { (pb, pa) };
        let mut common = s1.clone();
        for (i, c) in s1.iter().enumerate() {
            if s2.get(i) != Some(c) {
                common = s1[..i].to_vec();
                break;
            }
        }
        format!("/{}", common.join("/"))
    }
}

// ---------------------------------------------------------------------------------------
// Node classes (`nodes.py` INPUT_TYPES, RETURN_TYPES, OUTPUT_NODE)
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
enum InputType {
    T(&'static str),
    /// A combo: the value must be one of these.
    Combo(Vec<J>),
}

impl InputType {
    fn to_j(&self) -> J {
        match self {
            InputType::T(t) => J::from(*t),
            InputType::Combo(v) => J::Arr(v.clone()),
        }
    }
}

#[derive(Clone)]
struct InputDef {
    name: &'static str,
    ty: InputType,
    /// The options dict (`input_info[1]`, or `{}`).
    extra: J,
}

fn input(name: &'static str, ty: &'static str, extra: J) -> InputDef {
    InputDef {
        name,
        ty: InputType::T(ty),
        extra,
    }
}

fn combo(name: &'static str, options: Vec<String>, extra: J) -> InputDef {
    InputDef {
        name,
        ty: InputType::Combo(options.into_iter().map(J::Str).collect()),
        extra,
    }
}

#[derive(Clone)]
struct ClassDef {
    required: Vec<InputDef>,
    returns: Vec<&'static str>,
    output_node: bool,
    /// `LoadImage.VALIDATE_INPUTS(image)` and `IS_CHANGED(image)`.
    load_image: bool,
    /// A stand-in for a node that needs a model: missing inputs are let through unless
    /// `Options::strict_model_inputs`.
    model: bool,
    /// `SaveImage`'s hidden `prompt` and `extra_pnginfo`.
    hidden_prompt: bool,
}

impl ClassDef {
    fn new(required: Vec<InputDef>, returns: Vec<&'static str>) -> ClassDef {
        ClassDef {
            required,
            returns,
            output_node: false,
            load_image: false,
            model: false,
            hidden_prompt: false,
        }
    }
    fn model(mut self) -> ClassDef {
        self.model = true;
        self
    }
    fn find(&self, name: &str) -> Option<&InputDef> {
        self.required.iter().find(|i| i.name == name)
    }
}

const MAX_RESOLUTION: i64 = 16384;

/// `comfy.samplers.KSampler.SAMPLERS` and `SCHEDULERS` in 0.3.64.
const SAMPLERS: &[&str] = &[
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
];
const SCHEDULERS: &[&str] = &[
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `folder_paths.supported_pt_extensions`.
fn is_model_file(name: &str) -> bool {
    let ext = posix::splitext(name).1.to_lowercase();
    [
        ".ckpt",
        ".pt",
        ".pt2",
        ".bin",
        ".pth",
        ".safetensors",
        ".pkl",
        ".sft",
    ]
    .contains(&ext.as_str())
}

/// `mimetypes.guess_type`'s image extensions (`filter_files_content_types(files, ["image"])`).
fn is_image_name(name: &str) -> bool {
    let ext = name.rsplit('.').next().unwrap_or("").to_lowercase();
    [
        "png", "jpg", "jpeg", "jpe", "gif", "bmp", "webp", "tif", "tiff", "ico", "svg", "avif",
        "heic", "heif", "ppm", "pgm", "pbm", "pnm", "ras", "xbm", "xpm", "xwd", "ief", "rgb",
    ]
    .contains(&ext.as_str())
}

fn sampler_inputs(advanced: bool) -> Vec<InputDef> {
    let int = |d: i128, min: i128, max: i128| obj! {"default" => d, "min" => min, "max" => max};
    let seed =
        obj! {"default" => 0, "min" => 0, "max" => u64::MAX, "control_after_generate" => true};
    let cfg = obj! {"default" => 8.0, "min" => 0.0, "max" => 100.0, "step" => 0.1, "round" => 0.01};
    let mut v = vec![input("model", "MODEL", obj! {})];
    if advanced {
        v.push(combo("add_noise", strings(&["enable", "disable"]), obj! {}));
        v.push(input("noise_seed", "INT", seed));
    } else {
        v.push(input("seed", "INT", seed));
    }
    v.extend([
        input("steps", "INT", int(20, 1, 10000)),
        input("cfg", "FLOAT", cfg),
        combo("sampler_name", strings(SAMPLERS), obj! {}),
        combo("scheduler", strings(SCHEDULERS), obj! {}),
        input("positive", "CONDITIONING", obj! {}),
        input("negative", "CONDITIONING", obj! {}),
        input("latent_image", "LATENT", obj! {}),
    ]);
    if advanced {
        v.extend([
            input("start_at_step", "INT", int(0, 0, 10000)),
            input("end_at_step", "INT", int(10000, 0, 10000)),
            combo(
                "return_with_leftover_noise",
                strings(&["disable", "enable"]),
                obj! {},
            ),
        ]);
    } else {
        v.push(input(
            "denoise",
            "FLOAT",
            obj! {"default" => 1.0, "min" => 0.0, "max" => 1.0, "step" => 0.01},
        ));
    }
    v
}

impl Shared {
    /// `folder_paths.get_filename_list(folder)` over the model files it has.
    fn model_list(&self, folders: &[&str]) -> Vec<String> {
        let models = self.models.lock().unwrap();
        let mut out: Vec<String> = models
            .iter()
            .filter_map(|m| {
                folders
                    .iter()
                    .find_map(|f| m.strip_prefix(&format!("{f}/")))
                    .filter(|rest| is_model_file(rest))
                    .map(str::to_string)
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn input_images(&self) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(&self.input_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_image_name(n))
            .collect();
        files.sort();
        files
    }

    /// `nodes.NODE_CLASS_MAPPINGS[class]`, for the classes the double has.
    fn class_def(&self, class: &str) -> Option<ClassDef> {
        let image_size = |d| {
            obj! {"default" => d, "min" => 1, "max" => MAX_RESOLUTION, "step" => 1}
        };
        let def = match class {
            "EmptyImage" => ClassDef::new(
                vec![
                    input("width", "INT", image_size(512)),
                    input("height", "INT", image_size(512)),
                    input(
                        "batch_size",
                        "INT",
                        obj! {"default" => 1, "min" => 1, "max" => 4096},
                    ),
                    input(
                        "color",
                        "INT",
                        obj! {"default" => 0, "min" => 0, "max" => 0xFFFFFF, "step" => 1, "display" => "color"},
                    ),
                ],
                vec!["IMAGE"],
            ),
            "ImageInvert" => ClassDef::new(vec![input("image", "IMAGE", obj! {})], vec!["IMAGE"]),
            "LoadImage" => ClassDef {
                load_image: true,
                ..ClassDef::new(
                    vec![combo(
                        "image",
                        self.input_images(),
                        obj! {"image_upload" => true},
                    )],
                    vec!["IMAGE", "MASK"],
                )
            },
            "SaveImage" => ClassDef {
                output_node: true,
                hidden_prompt: true,
                ..ClassDef::new(
                    vec![
                        input("images", "IMAGE", obj! {"tooltip" => "The images to save."}),
                        input(
                            "filename_prefix",
                            "STRING",
                            obj! {"default" => "ComfyUI", "tooltip" => "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."},
                        ),
                    ],
                    vec![],
                )
            },
            "PreviewImage" => ClassDef {
                output_node: true,
                hidden_prompt: true,
                ..ClassDef::new(vec![input("images", "IMAGE", obj! {})], vec![])
            },
            "CheckpointLoaderSimple" => ClassDef::new(
                vec![combo(
                    "ckpt_name",
                    self.model_list(&["checkpoints"]),
                    obj! {"tooltip" => "The name of the checkpoint (model) to load."},
                )],
                vec!["MODEL", "CLIP", "VAE"],
            )
            .model(),
            "UNETLoader" => ClassDef::new(
                vec![
                    combo(
                        "unet_name",
                        self.model_list(&["unet", "diffusion_models"]),
                        obj! {},
                    ),
                    combo(
                        "weight_dtype",
                        strings(&["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]),
                        obj! {},
                    ),
                ],
                vec!["MODEL"],
            )
            .model(),
            "VAELoader" => {
                let mut vaes = self.model_list(&["vae"]);
                vaes.push("pixel_space".into());
                ClassDef::new(vec![combo("vae_name", vaes, obj! {})], vec!["VAE"]).model()
            }
            "LoraLoader" => {
                let strength = || {
                    obj! {"default" => 1.0, "min" => -100.0, "max" => 100.0, "step" => 0.01}
                };
                ClassDef::new(
                    vec![
                        input("model", "MODEL", obj! {}),
                        input("clip", "CLIP", obj! {}),
                        combo(
                            "lora_name",
                            self.model_list(&["loras"]),
                            obj! {"tooltip" => "The name of the LoRA."},
                        ),
                        input("strength_model", "FLOAT", strength()),
                        input("strength_clip", "FLOAT", strength()),
                    ],
                    vec!["MODEL", "CLIP"],
                )
                .model()
            }
            "CLIPTextEncode" => ClassDef::new(
                vec![
                    input(
                        "text",
                        "STRING",
                        obj! {"multiline" => true, "dynamicPrompts" => true},
                    ),
                    input("clip", "CLIP", obj! {}),
                ],
                vec!["CONDITIONING"],
            )
            .model(),
            "EmptyLatentImage" => {
                let size =
                    |d| obj! {"default" => d, "min" => 16, "max" => MAX_RESOLUTION, "step" => 8};
                ClassDef::new(
                    vec![
                        input("width", "INT", size(512)),
                        input("height", "INT", size(512)),
                        input(
                            "batch_size",
                            "INT",
                            obj! {"default" => 1, "min" => 1, "max" => 4096},
                        ),
                    ],
                    vec!["LATENT"],
                )
                .model()
            }
            "KSampler" => ClassDef::new(sampler_inputs(false), vec!["LATENT"]).model(),
            "KSamplerAdvanced" => ClassDef::new(sampler_inputs(true), vec!["LATENT"]).model(),
            "VAEDecode" => ClassDef::new(
                vec![
                    input("samples", "LATENT", obj! {}),
                    input("vae", "VAE", obj! {}),
                ],
                vec!["IMAGE"],
            )
            .model(),
            other if self.faults.lock().unwrap().fail_class.as_deref() == Some(other) => {
                ClassDef::new(vec![], vec!["*"]).model()
            }
            _ => return None,
        };
        Some(def)
    }
}

impl Shared {
    /// `server.py` `node_info`: what `/object_info` says of a class. Exact for the
    /// model-free classes; the model stand-ins lack descriptions and most tooltips.
    fn node_info(&self, class: &str) -> Option<J> {
        let def = self.class_def(class)?;
        let (display, category, description) = match class {
            "EmptyImage" => ("EmptyImage", "image", ""),
            "ImageInvert" => ("Invert Image", "image", ""),
            "LoadImage" => ("Load Image", "image", ""),
            "SaveImage" => (
                "Save Image",
                "image",
                "Saves the input images to your ComfyUI output directory.",
            ),
            // Inherits SaveImage's DESCRIPTION and CATEGORY.
            "PreviewImage" => (
                "Preview Image",
                "image",
                "Saves the input images to your ComfyUI output directory.",
            ),
            "CheckpointLoaderSimple" => ("Load Checkpoint", "loaders", ""),
            "UNETLoader" => ("Load Diffusion Model", "advanced/loaders", ""),
            "VAELoader" => ("Load VAE", "loaders", ""),
            "LoraLoader" => ("Load LoRA", "loaders", ""),
            "CLIPTextEncode" => ("CLIP Text Encode (Prompt)", "conditioning", ""),
            "EmptyLatentImage" => ("Empty Latent Image", "latent", ""),
            "KSampler" => ("KSampler", "sampling", ""),
            "KSamplerAdvanced" => ("KSampler (Advanced)", "sampling", ""),
            "VAEDecode" => ("VAE Decode", "latent", ""),
            _ => (class, "sd", ""),
        };
        let mut required = obj! {};
        for i in &def.required {
            // `("IMAGE",)` has no options dict; validation errors show `{}` for it.
            let spec = if i.extra.entries().is_empty() {
                J::Arr(vec![i.ty.to_j()])
            } else {
                J::Arr(vec![i.ty.to_j(), i.extra.clone()])
            };
            required.set(i.name, spec);
        }
        let names: Vec<&str> = def.required.iter().map(|i| i.name).collect();
        let mut input = obj! {"required" => required};
        let mut order = obj! {"required" => names};
        if def.hidden_prompt {
            input.set(
                "hidden",
                obj! {"prompt" => "PROMPT", "extra_pnginfo" => "EXTRA_PNGINFO"},
            );
            order.set("hidden", J::from(vec!["prompt", "extra_pnginfo"]));
        }
        Some(obj! {
            "input" => input,
            "input_order" => order,
            "output" => def.returns.clone(),
            "output_is_list" => vec![false; def.returns.len()],
            "output_name" => def.returns.clone(),
            "name" => class,
            "display_name" => display,
            "description" => description,
            "python_module" => "nodes",
            "category" => category,
            "output_node" => def.output_node,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Validation (`execution.py` `validate_prompt` and `validate_inputs`)
// ---------------------------------------------------------------------------------------

/// `(valid, reasons)` of one node, kept in `validated` (a dict: first place, last value).
type Validated = Vec<(String, (bool, Vec<J>))>;

fn set_validated(validated: &mut Validated, id: &str, v: (bool, Vec<J>)) {
    match validated.iter_mut().find(|(k, _)| k == id) {
        Some(e) => e.1 = v,
        None => validated.push((id.to_string(), v)),
    }
}

/// `is_link`: `[str, int|float]`.
fn is_link(v: &J) -> bool {
    matches!(v, J::Arr(a) if a.len() == 2 && matches!(a[0], J::Str(_)) && matches!(a[1], J::Int(_) | J::Float(_)))
}

fn error(kind: &str, message: impl Into<J>, details: impl Into<J>, extra: J) -> J {
    obj! {"type" => kind, "message" => message, "details" => details, "extra_info" => extra}
}

struct Validator<'a> {
    s: &'a Shared,
    strict_models: bool,
    in_progress: HashSet<String>,
}

impl Validator<'_> {
    fn validate_inputs(
        &mut self,
        prompt: &mut J,
        id: &str,
        validated: &mut Validated,
    ) -> Result<(bool, Vec<J>), Exc> {
        if let Some((_, v)) = validated.iter().find(|(k, _)| k == id) {
            return Ok(v.clone());
        }
        // Python recurses until its limit on a cycle; here the first repeat raises.
        if !self.in_progress.insert(id.to_string()) {
            return Err(exc("RecursionError", "maximum recursion depth exceeded"));
        }
        let result = self.validate_node(prompt, id, validated);
        self.in_progress.remove(id);
        let ret = result?;
        set_validated(validated, id, ret.clone());
        Ok(ret)
    }

    fn validate_node(
        &mut self,
        prompt: &mut J,
        id: &str,
        validated: &mut Validated,
    ) -> Result<(bool, Vec<J>), Exc> {
        let node = prompt.get(id).cloned().unwrap_or(J::Null);
        let Some(inputs) = node.get("inputs").cloned() else {
            return Err(exc("KeyError", "'inputs'"));
        };
        if !matches!(inputs, J::Obj(_)) {
            return Err(exc(
                "TypeError",
                format!("argument of type '{}' is not iterable", inputs.type_name()),
            ));
        }
        let class = node.get("class_type").map(J::py_str).unwrap_or_default();
        let def = self
            .s
            .class_def(&class)
            .ok_or_else(|| exc("KeyError", str_repr(&class)))?;
        let mut errors = Vec::new();
        let mut valid = true;
        let mut converted: Vec<(String, J)> = Vec::new();
        for info in &def.required {
            let x = info.name;
            let config = J::Arr(vec![info.ty.to_j(), info.extra.clone()]);
            let Some(mut val) = inputs.get(x).cloned() else {
                if !def.model || self.strict_models {
                    errors.push(error(
                        "required_input_missing",
                        "Required input is missing",
                        x,
                        obj! {"input_name" => x},
                    ));
                }
                continue;
            };
            if let J::Arr(link) = &val {
                if link.len() != 2 {
                    errors.push(error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        x,
                        obj! {"input_name" => x, "input_config" => config, "received_value" => &val},
                    ));
                    continue;
                }
                let o_id = match &link[0] {
                    J::Str(s) => s.clone(),
                    J::Arr(_) | J::Obj(_) => {
                        return Err(exc(
                            "TypeError",
                            format!("unhashable type: '{}'", link[0].type_name()),
                        ));
                    }
                    other => return Err(exc("KeyError", other.repr())),
                };
                let Some(o_node) = prompt.get(&o_id) else {
                    return Err(exc("KeyError", str_repr(&o_id)));
                };
                let o_class = o_node.get("class_type").map(J::py_str).unwrap_or_default();
                let returns = self
                    .s
                    .class_def(&o_class)
                    .map(|d| d.returns)
                    .unwrap_or_default();
                let index = match &link[1] {
                    J::Int(n) => *n,
                    J::Bool(b) => *b as i128,
                    other => {
                        return Err(exc(
                            "TypeError",
                            format!(
                                "tuple indices must be integers or slices, not {}",
                                other.type_name()
                            ),
                        ));
                    }
                };
                let len = returns.len() as i128;
                let at = if index < 0 { index + len } else { index };
                if at < 0 || at >= len {
                    return Err(exc("IndexError", "tuple index out of range"));
                }
                let received = returns[at as usize];
                let matches = match &info.ty {
                    // `validate_node_input`: equal, or overlapping comma lists; `*` is the
                    // "any" type custom nodes declare.
                    InputType::T(want) => {
                        received == *want
                            || received == "*"
                            || received
                                .split(',')
                                .any(|r| want.split(',').any(|w| w.trim() == r.trim()))
                    }
                    InputType::Combo(_) => false,
                };
                if !matches {
                    errors.push(error(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        format!(
                            "{x}, received_type({received}) mismatch input_type({})",
                            info.ty.to_j().py_str()
                        ),
                        obj! {"input_name" => x, "input_config" => config, "received_type" => received, "linked_node" => &val},
                    ));
                    continue;
                }
                match self.validate_inputs(prompt, &o_id, validated) {
                    Ok((false, _)) => valid = false,
                    Ok(_) => {}
                    Err(e) => {
                        valid = false;
                        let reasons = vec![error(
                            "exception_during_inner_validation",
                            "Exception when validating inner node",
                            e.msg.clone(),
                            obj! {
                                "input_name" => x, "input_config" => config,
                                "exception_message" => e.msg, "exception_type" => e.ty,
                                "traceback" => J::Arr(vec![]), "linked_node" => &val,
                            },
                        )];
                        set_validated(validated, &o_id, (false, reasons));
                    }
                }
                continue;
            }
            if let J::Obj(_) = &val
                && let Some(inner) = val.get("__value__").cloned()
            {
                val = inner;
                converted.push((x.to_string(), val.clone()));
            }
            let conversion = match &info.ty {
                InputType::T("INT") => Some(py_int(&val)),
                InputType::T("FLOAT") => Some(py_float(&val)),
                InputType::T("STRING") => Some(Ok(J::Str(val.py_str()))),
                InputType::T("BOOLEAN") => Some(Ok(J::Bool(val.truthy()))),
                _ => None,
            };
            if let Some(conversion) = conversion {
                match conversion {
                    Ok(v) => {
                        val = v;
                        converted.push((x.to_string(), val.clone()));
                    }
                    Err(e) => {
                        errors.push(error(
                            "invalid_input_type",
                            format!(
                                "Failed to convert an input value to a {} value",
                                info.ty.to_j().py_str()
                            ),
                            format!("{x}, {}, {}", val.py_str(), e.msg),
                            obj! {"input_name" => x, "input_config" => config, "received_value" => &val, "exception_message" => e.msg},
                        ));
                        continue;
                    }
                }
            }
            // LoadImage's own VALIDATE_INPUTS takes `image`: no generic checks for it.
            if def.load_image && x == "image" {
                continue;
            }
            if let (Some(min), Some(v)) = (info.extra.get("min").and_then(J::num), val.num())
                && v < min
            {
                errors.push(error(
                    "value_smaller_than_min",
                    format!(
                        "Value {} smaller than min of {}",
                        val.py_str(),
                        info.extra.get("min").unwrap().py_str()
                    ),
                    x,
                    obj! {"input_name" => x, "input_config" => config, "received_value" => &val},
                ));
                continue;
            }
            if let (Some(max), Some(v)) = (info.extra.get("max").and_then(J::num), val.num())
                && v > max
            {
                errors.push(error(
                    "value_bigger_than_max",
                    format!(
                        "Value {} bigger than max of {}",
                        val.py_str(),
                        info.extra.get("max").unwrap().py_str()
                    ),
                    x,
                    obj! {"input_name" => x, "input_config" => config, "received_value" => &val},
                ));
                continue;
            }
            if let InputType::Combo(options) = &info.ty
                && !options.iter().any(|o| o.py_eq(&val))
            {
                // "Don't send back gigantic lists" (more than 20 options).
                let (list_info, input_config) = if options.len() > 20 {
                    (format!("(list of length {})", options.len()), J::Null)
                } else {
                    (J::Arr(options.clone()).repr(), config)
                };
                errors.push(error(
                    "value_not_in_list",
                    "Value not in list",
                    format!("{x}: '{}' not in {list_info}", val.py_str()),
                    obj! {"input_name" => x, "input_config" => input_config, "received_value" => &val},
                ));
                continue;
            }
        }
        // Conversions are written back into the prompt, as `inputs[x] = val` does.
        if let Some(node_inputs) = prompt.get_mut(id).and_then(|n| n.get_mut("inputs")) {
            for (k, v) in converted {
                node_inputs.set(&k, v);
            }
        }
        if def.load_image {
            // VALIDATE_INPUTS(image), with the constant (a link reads as None).
            let image = match inputs.get("image") {
                None => {
                    return Err(exc(
                        "TypeError",
                        "LoadImage.VALIDATE_INPUTS() missing 1 required positional argument: 'image'",
                    ));
                }
                Some(v) if is_link(v) => J::Null,
                Some(v) => prompt
                    .get(id)
                    .and_then(|n| n.get("inputs"))
                    .and_then(|i| i.get("image"))
                    .cloned()
                    .unwrap_or_else(|| v.clone()),
            };
            let J::Str(name) = &image else {
                return Err(exc(
                    "AttributeError",
                    format!("'{}' object has no attribute 'endswith'", image.type_name()),
                ));
            };
            if !self.s.annotated_path(name, &self.s.input_dir).exists() {
                errors.push(error(
                    "custom_validation_failed",
                    "Custom validation failed for node",
                    format!("image - Invalid image file: {name}"),
                    obj! {"input_name" => "image"},
                ));
            }
        }
        Ok((errors.is_empty() && valid, errors))
    }
}

/// What `validate_prompt` returns: `(valid, error, good_outputs, node_errors)`, or the
/// exception its caller turns into a 500.
fn validate_prompt(
    s: &Shared,
    prompt: &mut J,
    partial: Option<&J>,
) -> Result<(bool, J, Vec<String>, J), Exc> {
    let ids: Vec<String> = match prompt {
        J::Obj(v) => v.iter().map(|(k, _)| k.clone()).collect(),
        J::Arr(v) if v.is_empty() => vec![],
        J::Str(v) if v.is_empty() => vec![],
        other => {
            return Err(exc(
                "TypeError",
                format!("bad prompt of type {}", other.type_name()),
            ));
        }
    };
    let mut outputs = Vec::new();
    for x in &ids {
        let node = prompt.get(x).unwrap();
        let class = match node {
            J::Obj(_) => node.get("class_type"),
            J::Str(_) | J::Arr(_) => None,
            other => {
                return Err(exc(
                    "TypeError",
                    format!("argument of type '{}' is not iterable", other.type_name()),
                ));
            }
        };
        let Some(class) = class else {
            let e = error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                format!("Node ID '#{x}'"),
                obj! {},
            );
            return Ok((false, e, vec![], obj! {}));
        };
        if matches!(class, J::Arr(_) | J::Obj(_)) {
            return Err(exc(
                "TypeError",
                format!("unhashable type: '{}'", class.type_name()),
            ));
        }
        let Some(def) = s.class_def(&class.py_str()) else {
            let e = error(
                "invalid_prompt",
                format!(
                    "Cannot execute because node {} does not exist.",
                    class.py_str()
                ),
                format!("Node ID '#{x}'"),
                obj! {},
            );
            return Ok((false, e, vec![], obj! {}));
        };
        let wanted = match partial {
            None | Some(J::Null) => true,
            Some(J::Arr(list)) => list.iter().any(|t| t.as_str() == Some(x)),
            Some(_) => false,
        };
        if def.output_node && wanted {
            outputs.push(x.clone());
        }
    }
    if outputs.is_empty() {
        let e = error("prompt_no_outputs", "Prompt has no outputs", "", obj! {});
        return Ok((false, e, vec![], obj! {}));
    }
    let strict_models = s.options.lock().unwrap().strict_model_inputs;
    let mut v = Validator {
        s,
        strict_models,
        in_progress: HashSet::new(),
    };
    let mut good = Vec::new();
    let mut failed: Vec<Vec<J>> = Vec::new();
    let mut node_errors = obj! {};
    let mut validated: Validated = Vec::new();
    for o in &outputs {
        let (ok, reasons) = match v.validate_inputs(prompt, o, &mut validated) {
            Ok(r) => r,
            Err(e) => {
                let reasons = vec![error(
                    "exception_during_validation",
                    "Exception when validating node",
                    e.msg,
                    obj! {"exception_type" => e.ty, "traceback" => J::Arr(vec![])},
                )];
                set_validated(&mut validated, o, (false, reasons.clone()));
                (false, reasons)
            }
        };
        if ok {
            good.push(o.clone());
            continue;
        }
        failed.push(reasons);
        // Every node validated so far with errors, not only this output's ancestors.
        for (node_id, (node_ok, node_reasons)) in &validated {
            if *node_ok || node_reasons.is_empty() {
                continue;
            }
            if node_errors.get(node_id).is_none() {
                let class = prompt
                    .get(node_id)
                    .and_then(|n| n.get("class_type"))
                    .cloned()
                    .unwrap_or(J::Null);
                node_errors.set(
                    node_id,
                    obj! {"errors" => J::Arr(node_reasons.clone()), "dependent_outputs" => J::Arr(vec![]), "class_type" => class},
                );
            }
            if let Some(J::Arr(deps)) = node_errors
                .get_mut(node_id)
                .and_then(|e| e.get_mut("dependent_outputs"))
            {
                deps.push(J::from(o));
            }
        }
    }
    if good.is_empty() {
        let details: Vec<String> = failed
            .iter()
            .flatten()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.get("message").map(J::py_str).unwrap_or_default(),
                    e.get("details").map(J::py_str).unwrap_or_default()
                )
            })
            .collect();
        let e = error(
            "prompt_outputs_failed_validation",
            "Prompt outputs failed validation",
            details.join("\n"),
            obj! {},
        );
        return Ok((false, e, good, node_errors));
    }
    Ok((true, J::Null, good, node_errors))
}

// ---------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------

/// A queue entry: `(number, prompt_id, prompt, extra_data, outputs_to_execute)`.
#[derive(Clone)]
struct Item {
    number: J,
    prompt_id: String,
    prompt: J,
    extra: J,
    outputs: Vec<String>,
}

impl Item {
    fn to_j(&self) -> J {
        J::Arr(vec![
            self.number.clone(),
            J::from(&self.prompt_id),
            self.prompt.clone(),
            self.extra.clone(),
            J::from(self.outputs.clone()),
        ])
    }

    /// The tuple order `heapq` sorts by (number, then prompt id).
    fn lt(&self, other: &Item) -> bool {
        let (a, b) = (
            self.number.num().unwrap_or(0.0),
            other.number.num().unwrap_or(0.0),
        );
        a < b || (a == b && self.prompt_id < other.prompt_id)
    }

    fn client(&self) -> Option<String> {
        // `server.client_id` may be any JSON value; only a string matches a socket's id.
        self.extra.get("client_id").map(|c| match c {
            J::Str(s) => s.clone(),
            other => format!("\u{0}{}", other.dump()),
        })
    }
}

/// Python's `heapq`, so `/queue` lists pending prompts in the heap's own order.
mod heapq {
    use super::Item;

    fn sift_down(heap: &mut [Item], start: usize, mut pos: usize) {
        while pos > start {
            let parent = (pos - 1) >> 1;
            if heap[pos].lt(&heap[parent]) {
                heap.swap(pos, parent);
                pos = parent;
                continue;
            }
            break;
        }
    }

    fn sift_up(heap: &mut [Item], mut pos: usize) {
        let (end, start) = (heap.len(), pos);
        let mut child = 2 * pos + 1;
        while child < end {
            let right = child + 1;
            if right < end && !heap[child].lt(&heap[right]) {
                child = right;
            }
            heap.swap(pos, child);
            pos = child;
            child = 2 * pos + 1;
        }
        sift_down(heap, start, pos);
    }

    pub fn push(heap: &mut Vec<Item>, item: Item) {
        heap.push(item);
        let last = heap.len() - 1;
        sift_down(heap, 0, last);
    }

    pub fn pop(heap: &mut Vec<Item>) -> Option<Item> {
        let last = heap.pop()?;
        if heap.is_empty() {
            return Some(last);
        }
        let top = std::mem::replace(&mut heap[0], last);
        sift_up(heap, 0);
        Some(top)
    }

    pub fn heapify(heap: &mut [Item]) {
        for i in (0..heap.len() / 2).rev() {
            sift_up(heap, i);
        }
    }
}

/// An image batch: solid frames (`[H, W, 3]` float32 tensors in ComfyUI).
#[derive(Clone, Debug)]
struct Frame {
    w: u32,
    h: u32,
    rgb: [f32; 3],
}

/// What a node output holds.
#[derive(Clone, Debug)]
enum Val {
    Image(Vec<Frame>),
    Latent { w: u32, h: u32, batch: u32 },
    Opaque(&'static str),
}

impl Val {
    /// `format_value`: `str(tensor)`, shortened.
    fn describe(&self) -> String {
        match self {
            Val::Image(f) => format!(
                "tensor of shape [{}, {}, {}, 3]",
                f.len(),
                f.first().map(|f| f.h).unwrap_or(0),
                f.first().map(|f| f.w).unwrap_or(0)
            ),
            Val::Latent { w, h, batch } => {
                format!(
                    "{{'samples': tensor of shape [{batch}, 4, {}, {}]}}",
                    h / 8,
                    w / 8
                )
            }
            Val::Opaque(kind) => format!("<{kind}>"),
        }
    }
}

/// `CacheSet`'s classic caches: outputs and UI by input signature, node objects by id.
#[derive(Default)]
struct Caches {
    outputs: HashMap<String, Vec<Val>>,
    /// `{"meta": ..., "output": ...}` as `execute` stores it.
    ui: HashMap<String, J>,
    /// `PreviewImage`'s random prefix, per `(node id, class)`.
    objects: HashMap<(String, String), String>,
}

#[derive(Default)]
struct Inner {
    /// `PromptServer.number`.
    number: i128,
    queue: Vec<Item>,
    running: Option<Item>,
    history: Vec<(String, J)>,
    interrupt: bool,
    /// `server.client_id`: the last prompt's client (kept after it ends).
    client_id: Option<String>,
    last_node_id: Option<String>,
    caches: Caches,
    /// `POST /free` asked to unload models.
    unload: bool,
    /// Prompt ids in the order they started: what ran here.
    started: Vec<String>,
    /// Prompt ids refused by validation (a 400), in order.
    refused: Vec<String>,
    uploads: Vec<String>,
    loaded: Option<String>,
    /// Checkpoint loads (the first load counts: a fresh pod has nothing loaded).
    switches: usize,
    /// The most prompts held at once (running and pending) since the last reset: what
    /// a test reads, not part of ComfyUI.
    most_held: usize,
}

enum Out {
    Text(String),
    Binary(Vec<u8>),
}

struct Sock {
    tx: mpsc::UnboundedSender<Out>,
    /// `sockets_metadata[sid]["feature_flags"]`.
    flags: J,
}

struct Shared {
    name: String,
    config: FakeConfig,
    options: Mutex<Options>,
    /// `config.models` at start; `set_models` replaces it (a double rescanning its models).
    models: Mutex<Vec<String>>,
    output_dir: String,
    input_dir: String,
    temp_dir: String,
    inner: Mutex<Inner>,
    work: Notify,
    sockets: Mutex<HashMap<String, Sock>>,
    faults: Mutex<Faults>,
    kill: watch::Sender<bool>,
    drop_ws: watch::Sender<u64>,
    dark: Arc<AtomicBool>,
}

pub struct FakeComfy {
    pub name: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// An absolute, normalised folder (ComfyUI's are `os.path.abspath`ed).
fn folder(p: &std::path::Path) -> String {
    std::fs::create_dir_all(p).unwrap();
    posix::abspath(&p.to_string_lossy())
}

impl FakeComfy {
    pub async fn start(name: &str, config: FakeConfig) -> FakeComfy {
        Self::start_with(name, config, Options::default()).await
    }

    pub async fn start_with(name: &str, config: FakeConfig, options: Options) -> FakeComfy {
        Self::start_on_with(name, config, options, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// On a given address: in a pod (the image of examples/fake_comfyui.rs), the pod IP's
    /// port, where the gateway and the kubelet's probes reach it.
    pub async fn start_on(name: &str, config: FakeConfig, listen: SocketAddr) -> FakeComfy {
        Self::start_on_with(name, config, Options::default(), listen).await
    }

    pub async fn start_on_with(
        name: &str,
        config: FakeConfig,
        options: Options,
        listen: SocketAddr,
    ) -> FakeComfy {
        let fresh = |kind: &str| {
            std::env::temp_dir().join(format!(
                "fake-comfy-{kind}-{name}-{}",
                super::unique_suffix()
            ))
        };
        let input_dir = folder(&options.input_dir.clone().unwrap_or_else(|| fresh("in")));
        // main.py's `cleanup_temp`: the temp folder starts empty.
        let temp = options.temp_dir.clone().unwrap_or_else(|| fresh("temp"));
        let _ = std::fs::remove_dir_all(&temp);
        let temp_dir = folder(&temp);
        let output_dir = folder(&config.output_dir);
        let (kill, _) = watch::channel(false);
        let (drop_ws, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            models: Mutex::new(config.models.clone()),
            config,
            options: Mutex::new(options),
            output_dir,
            input_dir,
            temp_dir,
            inner: Mutex::new(Inner::default()),
            work: Notify::new(),
            sockets: Mutex::new(HashMap::new()),
            faults: Mutex::new(Faults::default()),
            kill,
            drop_ws,
            dark: Arc::new(AtomicBool::new(false)),
        });
        let app = Router::new()
            .route("/prompt", post(post_prompt).get(get_prompt))
            .route("/queue", get(get_queue).post(post_queue))
            .route("/history", get(get_history).post(post_history))
            .route("/history/{id}", get(get_history_id))
            .route("/interrupt", post(post_interrupt))
            .route("/free", post(post_free))
            .route("/upload/image", post(upload_image))
            .route("/view", get(view))
            .route("/system_stats", get(system_stats))
            .route("/features", get(features))
            .route("/object_info", get(object_info))
            .route("/object_info/{class}", get(object_info_class))
            .route("/ws", get(ws))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            // aiohttp's limit is `max_upload_size`, checked in the handlers; axum's own
            // 2 MB default would refuse what ComfyUI takes.
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(
            listener,
            app,
            shared.kill.subscribe(),
            shared.dark.clone(),
        ));
        let worker = tokio::spawn(run_worker(shared.clone()));
        FakeComfy {
            name: name.to_string(),
            addr,
            shared,
            tasks: vec![server, worker],
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// As a killed pod: the listener and every connection close, nothing runs on.
    pub fn kill(&mut self) {
        let _ = self.shared.kill.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// As a machine that stopped answering: every open connection goes silent (no data,
    /// no close frame, no FIN), new ones are accepted and never answered, nothing runs on.
    /// `kill` or drop ends it.
    pub fn blackhole(&self) {
        self.shared.dark.store(true, Ordering::SeqCst);
    }

    /// Closes every websocket (the sockets drop; clients see the connection end).
    pub fn drop_websockets(&self) {
        self.shared.drop_ws.send_modify(|n| *n += 1);
        self.shared.sockets.lock().unwrap().clear();
    }

    /// The model files it has from now on (as `FakeConfig::models`).
    pub fn set_models(&self, models: Vec<String>) {
        *self.shared.models.lock().unwrap() = models;
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.shared.faults.lock().unwrap() = faults;
    }

    /// `--max-upload-size` (bytes) from now on.
    pub fn set_max_upload_size(&self, bytes: usize) {
        self.shared.options.lock().unwrap().max_upload_size = bytes;
    }

    pub fn set_options(&self, options: Options) {
        *self.shared.options.lock().unwrap() = options;
    }

    pub fn set_interrupt_generation(&self, generation: InterruptGeneration) {
        self.shared.options.lock().unwrap().interrupt_generation = generation;
    }

    /// Prompt ids that started here, in order.
    pub fn started(&self) -> Vec<String> {
        self.shared.inner.lock().unwrap().started.clone()
    }

    /// Prompt ids refused with a 400 here, in order.
    pub fn refused(&self) -> Vec<String> {
        self.shared.inner.lock().unwrap().refused.clone()
    }

    /// The most prompts this pod held at once (running and pending) since the last call:
    /// counted from then on.
    pub fn take_most_held(&self) -> usize {
        std::mem::take(&mut self.shared.inner.lock().unwrap().most_held)
    }

    /// How many times a prompt had to load a checkpoint other than the one loaded.
    pub fn switches(&self) -> usize {
        self.shared.inner.lock().unwrap().switches
    }

    pub fn running(&self) -> Option<String> {
        self.shared
            .inner
            .lock()
            .unwrap()
            .running
            .as_ref()
            .map(|i| i.prompt_id.clone())
    }

    pub fn uploads(&self) -> Vec<String> {
        self.shared.inner.lock().unwrap().uploads.clone()
    }

    /// Puts a file in `input/` (a name an upload will collide with).
    pub fn add_input(&self, name: &str, bytes: &[u8]) {
        std::fs::write(posix::join(&self.shared.input_dir, name), bytes).unwrap();
    }

    pub fn input_bytes(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(posix::join(&self.shared.input_dir, name)).ok()
    }

    /// `temp/`, where `PreviewImage` writes.
    pub fn temp_dir(&self) -> PathBuf {
        PathBuf::from(&self.shared.temp_dir)
    }

    pub fn input_dir(&self) -> PathBuf {
        PathBuf::from(&self.shared.input_dir)
    }

    /// The prompt a finished job ran with, from this pod's history.
    pub fn prompt_of(&self, id: &str) -> Option<Value> {
        let inner = self.shared.inner.lock().unwrap();
        inner
            .history
            .iter()
            .find(|(k, _)| k == id)
            .and_then(|(_, h)| match h.get("prompt") {
                Some(J::Arr(p)) => p.get(2).map(J::to_value),
                _ => None,
            })
    }
}

impl Drop for FakeComfy {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------

/// A connection that goes silent when the server is blackholed: reads and writes never
/// complete (and register no wake-up), so nothing is sent, not even a FIN, until `kill`.
struct Hole {
    io: tokio::net::TcpStream,
    dark: Arc<AtomicBool>,
}

impl AsyncRead for Hole {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.dark.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Hole {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if me.dark.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut me.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.dark.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut me.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.dark.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut me.io).poll_shutdown(cx)
    }
}

/// Serves connections until killed; then drops every one of them.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    mut kill: watch::Receiver<bool>,
    dark: Arc<AtomicBool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    // Connections accepted while dark: held open, never read.
    let mut held = Vec::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                while conns.try_join_next().is_some() {}
                if dark.load(Ordering::SeqCst) {
                    held.push(stream);
                    continue;
                }
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let io = Hole { io: stream, dark: dark.clone() };
                conns.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(io);
                    // HTTP/1.1 with upgrades (the websocket), as ComfyUI's aiohttp serves.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .with_upgrades()
                        .await;
                });
            }
            _ = kill.changed() => return,
        }
    }
}

impl Shared {
    /// `PromptServer.send_json(event, data, sid)`: to `sid` if it has a socket, to every
    /// socket without one.
    fn send(&self, event: &str, data: J, sid: Option<&str>) {
        let msg = obj! {"type" => event, "data" => data}.dump();
        self.deliver(sid, || Out::Text(msg.clone()));
    }

    /// `send_bytes`: `>I` event type, then the payload.
    fn send_bytes(&self, event: u32, payload: &[u8], sid: Option<&str>) {
        let mut msg = event.to_be_bytes().to_vec();
        msg.extend_from_slice(payload);
        self.deliver(sid, || Out::Binary(msg.clone()));
    }

    fn deliver(&self, sid: Option<&str>, out: impl Fn() -> Out) {
        let sockets = self.sockets.lock().unwrap();
        match sid {
            Some(sid) => {
                if let Some(sock) = sockets.get(sid) {
                    let _ = sock.tx.send(out());
                }
            }
            None => {
                for sock in sockets.values() {
                    let _ = sock.tx.send(out());
                }
            }
        }
    }

    /// `get_queue_info`.
    fn queue_info(&self) -> J {
        let inner = self.inner.lock().unwrap();
        let remaining = inner.queue.len() + inner.running.is_some() as usize;
        obj! {"exec_info" => obj! {"queue_remaining" => remaining}}
    }

    /// `queue_updated`: `status` to every socket.
    fn queue_updated(&self) {
        let status = self.queue_info();
        self.send("status", obj! {"status" => status}, None);
    }

    fn supports_preview_metadata(&self, sid: Option<&str>) -> bool {
        let Some(sid) = sid else { return false };
        self.sockets.lock().unwrap().get(sid).is_some_and(|s| {
            matches!(
                s.flags.get("supports_preview_metadata"),
                Some(J::Bool(true))
            )
        })
    }

    /// `folder_paths.get_annotated_filepath`: `name [input]`-style suffixes pick the folder.
    fn annotated_path(&self, name: &str, default: &str) -> PathBuf {
        let (name, base) = self.annotated(name);
        PathBuf::from(posix::join(base.unwrap_or(default), &name))
    }

    /// `folder_paths.annotated_filepath` (which strips one character more than the tag,
    /// the space before it).
    fn annotated<'a>(&'a self, name: &str) -> (String, Option<&'a str>) {
        let chars: Vec<char> = name.chars().collect();
        let cut = |n: usize| chars[..chars.len().saturating_sub(n)].iter().collect();
        if name.ends_with("[output]") {
            (cut(9), Some(&self.output_dir))
        } else if name.ends_with("[input]") {
            (cut(8), Some(&self.input_dir))
        } else if name.ends_with("[temp]") {
            (cut(7), Some(&self.temp_dir))
        } else {
            (name.to_string(), None)
        }
    }

    /// Parks for good while blackholed: a dead machine runs nothing.
    async fn hold_if_dark(&self) {
        if self.dark.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP handlers (`server.py` `PromptServer.__init__` routes)
// ---------------------------------------------------------------------------------------

/// `web.json_response`.
fn json_response(status: StatusCode, body: &J) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.dump(),
    )
        .into_response()
}

/// `web.Response(status=...)`: no body, and no Content-Type either (aiohttp leaves it
/// out when there is no body: seen against a real ComfyUI by scripts/fidelity).
fn empty(status: StatusCode) -> Response {
    (status, axum::body::Body::empty()).into_response()
}

/// What aiohttp answers when a handler raises (`handle_error`), closing the connection.
fn server_error() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CONNECTION, "close"),
        ],
        "500 Internal Server Error\n\nServer got itself in trouble",
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "404: Not Found",
    )
        .into_response()
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "405: Method Not Allowed",
    )
        .into_response()
}

fn now_ms() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i128
}

async fn post_prompt(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    {
        let mut faults = s.faults.lock().unwrap();
        if faults.refuse_prompts > 0 {
            faults.refuse_prompts -= 1;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    }
    // `await request.json()` raises on a bad body: a 500.
    let Some(data) = J::parse(&body) else {
        return server_error();
    };
    if !matches!(data, J::Obj(_) | J::Arr(_) | J::Str(_)) {
        return server_error();
    }
    let number = match data.get("number") {
        Some(n) => match py_float(n) {
            Ok(f) => f,
            Err(_) => return server_error(),
        },
        None => {
            let mut inner = s.inner.lock().unwrap();
            let n = inner.number;
            inner.number += 1;
            if data.get("front").is_some_and(J::truthy) {
                J::Int(-n)
            } else {
                J::Int(n)
            }
        }
    };
    let Some(mut prompt) = data.get("prompt").cloned() else {
        let error = error(
            "no_prompt",
            "No prompt provided",
            "No prompt provided",
            obj! {},
        );
        return json_response(
            StatusCode::BAD_REQUEST,
            &obj! {"error" => error, "node_errors" => obj! {}},
        );
    };
    let prompt_id = match data.get("prompt_id") {
        Some(id) => id.py_str(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let (valid, error, outputs, node_errors) =
        match validate_prompt(&s, &mut prompt, data.get("partial_execution_targets")) {
            Ok(v) => v,
            Err(_) => return server_error(),
        };
    let mut extra = data.get("extra_data").cloned().unwrap_or(obj! {});
    if let Some(client) = data.get("client_id") {
        if !matches!(extra, J::Obj(_)) {
            return server_error();
        }
        extra.set("client_id", client.clone());
    }
    if !valid {
        s.inner.lock().unwrap().refused.push(prompt_id);
        return json_response(
            StatusCode::BAD_REQUEST,
            &obj! {"error" => error, "node_errors" => node_errors},
        );
    }
    {
        let mut inner = s.inner.lock().unwrap();
        heapq::push(
            &mut inner.queue,
            Item {
                number: number.clone(),
                prompt_id: prompt_id.clone(),
                prompt,
                extra,
                outputs,
            },
        );
        let held = inner.queue.len() + usize::from(inner.running.is_some());
        inner.most_held = inner.most_held.max(held);
    }
    s.queue_updated();
    s.work.notify_one();
    json_response(
        StatusCode::OK,
        &obj! {"prompt_id" => prompt_id, "number" => number, "node_errors" => node_errors},
    )
}

async fn get_prompt(State(s): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, &s.queue_info())
}

async fn get_queue(State(s): State<Arc<Shared>>) -> Response {
    let inner = s.inner.lock().unwrap();
    let body = obj! {
        "queue_running" => inner.running.iter().map(Item::to_j).collect::<Vec<_>>(),
        "queue_pending" => inner.queue.iter().map(Item::to_j).collect::<Vec<_>>(),
    };
    json_response(StatusCode::OK, &body)
}

/// A body `await request.json()` reads; `"key" in` a list or string is merely false, so
/// only other JSON (or none) makes the handler raise.
fn json_body(body: &[u8]) -> Option<J> {
    J::parse(body).filter(|d| matches!(d, J::Obj(_) | J::Arr(_) | J::Str(_)))
}

async fn post_queue(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let Some(data) = json_body(&body) else {
        return server_error();
    };
    if data.get("clear").is_some_and(J::truthy) {
        s.inner.lock().unwrap().queue.clear();
        s.queue_updated();
    }
    if let Some(J::Arr(ids)) = data.get("delete") {
        for id in ids {
            // `delete_queue_item`: the first match only; the last one empties the queue.
            let deleted = {
                let mut inner = s.inner.lock().unwrap();
                match inner
                    .queue
                    .iter()
                    .position(|i| J::from(&i.prompt_id).py_eq(id))
                {
                    Some(_) if inner.queue.len() == 1 => {
                        inner.queue.clear();
                        2
                    }
                    Some(x) => {
                        inner.queue.remove(x);
                        heapq::heapify(&mut inner.queue);
                        1
                    }
                    None => 0,
                }
            };
            for _ in 0..deleted {
                s.queue_updated();
            }
        }
    }
    empty(StatusCode::OK)
}

async fn get_history(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let int = |k: &str| q.get(k).map(|v| py_int_text(v).ok_or(()));
    let (max_items, offset) = match (int("max_items"), int("offset")) {
        (Some(Err(_)), _) | (_, Some(Err(_))) => return server_error(),
        (m, o) => (m.map(Result::unwrap), o.map(Result::unwrap).unwrap_or(-1)),
    };
    let inner = s.inner.lock().unwrap();
    let mut offset = offset;
    if offset < 0
        && let Some(m) = max_items
    {
        offset = inner.history.len() as i128 - m;
    }
    let mut out = obj! {};
    for (i, (k, h)) in inner.history.iter().enumerate() {
        if i as i128 >= offset {
            out.set(k, h.clone());
            if max_items.is_some_and(|m| out.entries().len() as i128 >= m) {
                break;
            }
        }
    }
    json_response(StatusCode::OK, &out)
}

async fn get_history_id(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let inner = s.inner.lock().unwrap();
    let body = match inner.history.iter().find(|(k, _)| *k == id) {
        Some((_, h)) => obj! {id => h},
        None => obj! {},
    };
    json_response(StatusCode::OK, &body)
}

async fn post_history(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let Some(data) = json_body(&body) else {
        return server_error();
    };
    let mut inner = s.inner.lock().unwrap();
    if data.get("clear").is_some_and(J::truthy) {
        inner.history.clear();
    }
    if let Some(J::Arr(ids)) = data.get("delete") {
        for id in ids {
            inner.history.retain(|(k, _)| !J::from(k).py_eq(id));
        }
    }
    empty(StatusCode::OK)
}

async fn post_interrupt(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let generation = s.options.lock().unwrap().interrupt_generation;
    let mut inner = s.inner.lock().unwrap();
    if generation == InterruptGeneration::Old {
        // ≤ 0.3.56: `nodes.interrupt_processing()` whatever the body says.
        inner.interrupt = true;
        return empty(StatusCode::OK);
    }
    // A body that is not JSON counts as `{}`; JSON that is not an object raises.
    let data = J::parse(&body).unwrap_or(obj! {});
    let prompt_id = match &data {
        J::Obj(_) => data.get("prompt_id").cloned().unwrap_or(J::Null),
        _ => return server_error(),
    };
    if prompt_id.truthy() {
        let running = inner
            .running
            .as_ref()
            .is_some_and(|i| J::from(&i.prompt_id).py_eq(&prompt_id));
        if running {
            inner.interrupt = true;
        }
    } else {
        inner.interrupt = true;
    }
    empty(StatusCode::OK)
}

async fn post_free(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let Some(data) = J::parse(&body).filter(|d| matches!(d, J::Obj(_))) else {
        return server_error();
    };
    let free = data.get("free_memory").is_some_and(J::truthy);
    if data.get("unload_models").is_some_and(J::truthy) || free {
        s.inner.lock().unwrap().unload = true;
    }
    if free {
        // `e.reset()`: the caches go.
        s.inner.lock().unwrap().caches = Caches::default();
    }
    empty(StatusCode::OK)
}

async fn features() -> Response {
    json_response(StatusCode::OK, &server_features())
}

/// The classes `/object_info` lists (a `fail_class` stand-in is not one).
const CLASSES: &[&str] = &[
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "EmptyImage",
    "EmptyLatentImage",
    "ImageInvert",
    "KSampler",
    "KSamplerAdvanced",
    "LoadImage",
    "LoraLoader",
    "PreviewImage",
    "SaveImage",
    "UNETLoader",
    "VAEDecode",
    "VAELoader",
];

async fn object_info(State(s): State<Arc<Shared>>) -> Response {
    let mut out = obj! {};
    for class in CLASSES {
        if let Some(info) = s.node_info(class) {
            out.set(class, info);
        }
    }
    json_response(StatusCode::OK, &out)
}

async fn object_info_class(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(class): axum::extract::Path<String>,
) -> Response {
    let body = match CLASSES
        .contains(&class.as_str())
        .then(|| s.node_info(&class))
        .flatten()
    {
        Some(info) => obj! {class => info},
        None => obj! {},
    };
    json_response(StatusCode::OK, &body)
}

/// `feature_flags.SERVER_FEATURE_FLAGS` with the default `--max-upload-size 100`.
fn server_features() -> J {
    obj! {"supports_preview_metadata" => true, "max_upload_size" => 100 * 1024 * 1024}
}

async fn system_stats(State(s): State<Arc<Shared>>) -> Response {
    let version = s.options.lock().unwrap().version();
    let gib = 1i128 << 30;
    let body = obj! {
        "system" => obj! {
            "os" => "posix",
            "ram_total" => 64 * gib,
            "ram_free" => 48 * gib,
            "comfyui_version" => version,
            "required_frontend_version" => "1.27.10",
            "installed_templates_version" => "0.1.95",
            "required_templates_version" => "0.1.95",
            "python_version" => "3.12.3 (main, Jan 17 2025, 18:03:48) [GCC 13.3.0]",
            "pytorch_version" => "2.8.0+cu128",
            "embedded_python" => false,
            "argv" => vec!["main.py"],
        },
        "devices" => vec![obj! {
            "name" => format!("cuda:0 fake-gpu {} : cudaMallocAsync", s.name),
            "type" => "cuda",
            "index" => 0,
            "vram_total" => 24 * gib,
            "vram_free" => 20 * gib,
            "torch_vram_total" => 0,
            "torch_vram_free" => 0,
        }],
    };
    json_response(StatusCode::OK, &body)
}

/// A value of `await request.post()`.
enum PostVal {
    File { filename: String, bytes: Vec<u8> },
    Text(String),
    Bytes(Vec<u8>),
}

/// aiohttp's `parse_content_disposition` and `content_disposition_filename`: quoted values
/// lose leading slashes and backslashes and are unescaped; `filename*` is percent-decoded
/// and wins. Returns `(name, filename)`.
fn content_disposition(header: &str) -> (Option<String>, Option<String>) {
    let is_token = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?={}".contains(c))
    };
    let unescape = |s: &str| {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some(n) if "()<>@,;:\\\"/[]?={}".contains(n) => out.push(n),
                    Some(n) => {
                        out.push('\\');
                        out.push(n);
                    }
                    None => out.push('\\'),
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let quoted = |s: &str| s.len() >= 2 && s.starts_with('"') && s.ends_with('"');
    let mut parts: std::collections::VecDeque<&str> = header.split(';').collect();
    let disptype = parts.pop_front().unwrap_or("");
    if !is_token(disptype) {
        return (None, None);
    }
    let mut params: Vec<(String, String)> = Vec::new();
    while let Some(item) = parts.pop_front() {
        let Some((key, value)) = item.split_once('=') else {
            return (None, None);
        };
        let key = key.trim().to_lowercase();
        let mut value = value.trim_start().to_string();
        if params.iter().any(|(k, _)| *k == key) {
            return (None, None);
        }
        if !is_token(&key) {
            continue;
        }
        if key.ends_with('*') {
            let fields: Vec<&str> = value.splitn(3, '\'').collect();
            if !is_token(&value) || value.matches('\'').count() != 2 {
                continue;
            }
            value = percent_encoding::percent_decode_str(fields[2])
                .decode_utf8_lossy()
                .into_owned();
        } else if quoted(&value) {
            value = unescape(value[1..value.len() - 1].trim_start_matches(['\\', '/']));
        } else if !is_token(&value) {
            // "maybe just ; in filename"
            match parts.front() {
                Some(next) if quoted(&format!("{value};{next}")) => {
                    let joined = format!("{value};{next}");
                    parts.pop_front();
                    value = unescape(joined[1..joined.len() - 1].trim_start_matches(['\\', '/']));
                }
                _ => return (None, None),
            }
        }
        params.push((key, value));
    }
    let get = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
    (get("name"), get("filename*").or_else(|| get("filename")))
}

/// aiohttp's answer to a body over `client_max_size` (`HTTPRequestEntityTooLarge`).
fn too_large(max: usize, actual: usize) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("Maximum request body size {max} exceeded, actual body size {actual}"),
    )
        .into_response()
}

async fn upload_image(State(s): State<Arc<Shared>>, req: axum::extract::Request) -> Response {
    let max = s.options.lock().unwrap().max_upload_size;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared.filter(|len| *len > max) {
        return too_large(max, len);
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_lowercase())
        .unwrap_or_else(|| "application/octet-stream".into());
    let mut post: Vec<(String, PostVal)> = Vec::new();
    let mut read = 0usize;
    if content_type == "multipart/form-data" {
        let Ok(mut form) = axum::extract::Multipart::from_request(req, &()).await else {
            return server_error();
        };
        loop {
            let field = match form.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return server_error(),
            };
            let cd = field
                .headers()
                .get(header::CONTENT_DISPOSITION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let part_type = field.content_type().map(str::to_string);
            let (name, filename) = content_disposition(&cd);
            let Some(name) = name else {
                return server_error();
            };
            let Ok(bytes) = field.bytes().await else {
                return server_error();
            };
            read += bytes.len();
            if read > max {
                // A chunked body without a length: aiohttp counts as it reads.
                return too_large(max, read);
            }
            let value = match filename.filter(|f| !f.is_empty()) {
                Some(filename) => PostVal::File {
                    filename,
                    bytes: bytes.to_vec(),
                },
                None if part_type.as_deref().is_none_or(|t| t.starts_with("text/")) => {
                    PostVal::Text(String::from_utf8_lossy(&bytes).into_owned())
                }
                None => PostVal::Bytes(bytes.to_vec()),
            };
            post.push((name, value));
        }
    } else if content_type == "application/x-www-form-urlencoded" || content_type.is_empty() {
        let Ok(body) = Bytes::from_request(req, &()).await else {
            return server_error();
        };
        for (k, v) in url_pairs(&body) {
            post.push((k, PostVal::Text(v)));
        }
    }
    image_upload(&s, &post)
}

fn url_pairs(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    text.trim_end()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |x: &str| {
                percent_encoding::percent_decode_str(&x.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

/// `image_upload(post)`.
fn image_upload(s: &Shared, post: &[(String, PostVal)]) -> Response {
    let get = |k: &str| post.iter().find(|(n, _)| n == k).map(|(_, v)| v);
    let text = |k: &str| match get(k) {
        Some(PostVal::Text(t)) => Some(t.clone()),
        _ => None,
    };
    // `get_dir_by_type`: anything but input, temp and output leaves `type_dir` unbound.
    let (upload_dir, upload_type) = match get("type") {
        None => (s.input_dir.clone(), "input".to_string()),
        Some(PostVal::Text(t)) if t == "input" => (s.input_dir.clone(), t.clone()),
        Some(PostVal::Text(t)) if t == "temp" => (s.temp_dir.clone(), t.clone()),
        Some(PostVal::Text(t)) if t == "output" => (s.output_dir.clone(), t.clone()),
        Some(_) => return server_error(),
    };
    let (filename, bytes) = match get("image") {
        None => return empty(StatusCode::BAD_REQUEST),
        Some(PostVal::Text(t)) if t.is_empty() => return empty(StatusCode::BAD_REQUEST),
        Some(PostVal::Bytes(b)) if b.is_empty() => return empty(StatusCode::BAD_REQUEST),
        // `image.file` of a plain field raises.
        Some(PostVal::Text(_) | PostVal::Bytes(_)) => return server_error(),
        Some(PostVal::File { filename, bytes }) => (filename.clone(), bytes),
    };
    let subfolder = match get("subfolder") {
        None => String::new(),
        Some(PostVal::Text(t)) => t.clone(),
        Some(_) => return server_error(),
    };
    let overwrite = text("overwrite").is_some_and(|o| o == "true" || o == "1");
    let full_output_folder = posix::join(&upload_dir, &posix::normpath(&subfolder));
    let filepath = posix::abspath(&posix::join(&full_output_folder, &filename));
    if posix::commonpath(&upload_dir, &filepath) != upload_dir {
        return empty(StatusCode::BAD_REQUEST);
    }
    if std::fs::create_dir_all(&full_output_folder).is_err() {
        return server_error();
    }
    let (stem, ext) = posix::splitext(&filename);
    let mut name = filename.clone();
    let mut path = filepath;
    let mut duplicate = false;
    if !overwrite {
        let mut i = 1;
        while std::path::Path::new(&path).exists() {
            // `compare_image_hash`: the same bytes under that name are that upload again.
            match std::fs::read(&path) {
                Ok(existing) if existing == *bytes => {
                    duplicate = true;
                    break;
                }
                Ok(_) => {}
                Err(_) => return server_error(),
            }
            name = format!("{stem} ({i}){ext}");
            path = posix::join(&full_output_folder, &name);
            i += 1;
        }
    }
    if !duplicate && std::fs::write(&path, bytes).is_err() {
        return server_error();
    }
    s.inner.lock().unwrap().uploads.push(name.clone());
    json_response(
        StatusCode::OK,
        &obj! {"name" => name, "subfolder" => subfolder, "type" => upload_type},
    )
}

/// `mimetypes.guess_type`, for what the double serves.
fn mime_of(name: &str) -> &'static str {
    let ext = posix::splitext(name).1.to_lowercase();
    match ext.as_str() {
        ".png" => "image/png",
        ".jpg" | ".jpeg" | ".jpe" => "image/jpeg",
        ".gif" => "image/gif",
        ".webp" => "image/webp",
        ".bmp" => "image/bmp",
        ".tif" | ".tiff" => "image/tiff",
        ".txt" => "text/plain",
        ".json" => "application/json",
        ".mp4" => "video/mp4",
        ".webm" => "video/webm",
        ".wav" => "audio/x-wav",
        ".mp3" => "audio/mpeg",
        ".flac" => "audio/flac",
        _ => "application/octet-stream",
    }
}

/// `view_image`.
async fn view(State(s): State<Arc<Shared>>, Query(q): Query<Vec<(String, String)>>) -> Response {
    // `rel_url.query[k]`: the first of a repeated key.
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(filename) = get("filename") else {
        return empty(StatusCode::NOT_FOUND);
    };
    let (filename, annotated) = s.annotated(&filename);
    if filename.is_empty() || filename.starts_with('/') || filename.contains("..") {
        return empty(StatusCode::BAD_REQUEST);
    }
    let output_dir = match annotated {
        Some(dir) => dir.to_string(),
        None => match get("type").as_deref().unwrap_or("output") {
            "output" => s.output_dir.clone(),
            "temp" => s.temp_dir.clone(),
            "input" => s.input_dir.clone(),
            _ => return empty(StatusCode::BAD_REQUEST),
        },
    };
    let mut dir = output_dir.clone();
    if let Some(sub) = get("subfolder") {
        let full = posix::join(&output_dir, &sub);
        if posix::commonpath(&posix::abspath(&full), &output_dir) != output_dir {
            return empty(StatusCode::FORBIDDEN);
        }
        dir = full;
    }
    let base = posix::basename(&filename).to_string();
    let file = posix::join(&dir, &base);
    if !std::path::Path::new(&file).is_file() {
        return empty(StatusCode::NOT_FOUND);
    }
    match std::fs::read(&file) {
        Ok(bytes) => {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, mime_of(&base).parse().unwrap());
            if let Ok(v) = format!("filename=\"{base}\"").parse() {
                headers.insert(header::CONTENT_DISPOSITION, v);
            }
            (StatusCode::OK, headers, bytes).into_response()
        }
        Err(_) => empty(StatusCode::NOT_FOUND),
    }
}

async fn ws(
    State(s): State<Arc<Shared>>,
    Query(q): Query<Vec<(String, String)>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let sid = q
        .iter()
        .find(|(k, _)| k == "clientId")
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade.on_upgrade(move |socket| socket_loop(s, sid, socket))
}

/// `websocket_handler`, from `ws.prepare` on.
async fn socket_loop(s: Arc<Shared>, sid: String, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    // "Reusing existing session, remove old": the older socket is dropped from the map but
    // not closed; it stays open and is sent nothing more.
    s.sockets
        .lock()
        .unwrap()
        .insert(sid.clone(), Sock { tx, flags: obj! {} });
    s.send(
        "status",
        obj! {"status" => s.queue_info(), "sid" => &sid},
        Some(&sid),
    );
    // "On reconnect if we are the currently executing client send the current node".
    let current = {
        let inner = s.inner.lock().unwrap();
        (inner.client_id.as_deref() == Some(&sid))
            .then(|| inner.last_node_id.clone())
            .flatten()
    };
    if let Some(node) = current {
        s.send("executing", obj! {"node" => node}, Some(&sid));
    }
    let mut kill = s.kill.subscribe();
    let mut drop_ws = s.drop_ws.subscribe();
    let talk = async {
        let mut first = true;
        let mut rx_open = true;
        loop {
            tokio::select! {
                out = rx.recv(), if rx_open => {
                    let msg = match out {
                        Some(Out::Text(t)) => Message::Text(t.into()),
                        Some(Out::Binary(b)) => Message::Binary(b.into()),
                        // Replaced by a newer socket with this id: stay open, deaf.
                        None => { rx_open = false; continue; }
                    };
                    if socket.send(msg).await.is_err() {
                        return;
                    }
                }
                incoming = socket.recv() => match incoming {
                    Some(Ok(Message::Text(text))) => {
                        let Some(data) = J::parse(text.as_bytes()) else { continue };
                        if first && data.get("type").and_then(J::as_str) == Some("feature_flags") {
                            // Stored under the id (whichever socket holds it now) and
                            // answered to that id.
                            let flags = data.get("data").cloned().unwrap_or(obj! {});
                            let stored = match s.sockets.lock().unwrap().get_mut(&sid) {
                                Some(sock) => { sock.flags = flags; true }
                                // A KeyError there: logged, and still the first message.
                                None => false,
                            };
                            if !stored {
                                continue;
                            }
                            s.send("feature_flags", server_features(), Some(&sid));
                        }
                        if matches!(data, J::Obj(_)) {
                            first = false;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
                _ = drop_ws.changed() => return,
            }
        }
    };
    tokio::select! {
        _ = talk => {}
        _ = kill.changed() => {}
    }
    // `finally: self.sockets.pop(sid, None)`: by id, so a newer socket with this id loses
    // its place too.
    s.sockets.lock().unwrap().remove(&sid);
}

// ---------------------------------------------------------------------------------------
// Image bytes
// ---------------------------------------------------------------------------------------

/// An 8×8 mid-grey baseline JPEG (one Huffman code each for the DC category 0 and the AC
/// end-of-block): the preview a sampler step sends, standing in for a latent's preview.
const PREVIEW_JPEG: &[u8] = &[
    0xFF, 0xD8, // SOI
    0xFF, 0xDB, 0x00, 0x43, 0x00, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, // DQT: all ones
    0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x00, 0x08, 0x00, 0x08, 0x01, 0x01, 0x11, 0x00, // SOF0 8×8
    0xFF, 0xC4, 0x00, 0x14, 0x00, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // DHT DC
    0xFF, 0xC4, 0x00, 0x14, 0x10, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // DHT AC
    0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00, // SOS
    0x3F, // DC 0, EOB, padding ones
    0xFF, 0xD9, // EOI
];

impl Frame {
    /// `np.clip(255. * image, 0, 255).astype(np.uint8)` of a float32 pixel.
    fn bytes(&self) -> [u8; 3] {
        self.rgb.map(|c| (255.0f32 * c).clamp(0.0, 255.0) as u8)
    }
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// A PNG of a solid frame with `tEXt` chunks, as `SaveImage` writes one (`PngInfo`).
fn png(frame: &Frame, level: u32, texts: &[(String, String)]) -> Vec<u8> {
    use std::io::Write;
    let px = frame.bytes();
    let row: Vec<u8> = std::iter::once(0u8)
        .chain((0..frame.w).flat_map(|_| px))
        .collect();
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(level));
    for _ in 0..frame.h {
        z.write_all(&row).unwrap();
    }
    let data = z.finish().unwrap();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&frame.w.to_be_bytes());
    ihdr.extend_from_slice(&frame.h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    for (k, v) in texts {
        let mut t = k.as_bytes().to_vec();
        t.push(0);
        t.extend_from_slice(v.as_bytes());
        png_chunk(&mut out, b"tEXt", &t);
    }
    png_chunk(&mut out, b"IDAT", &data);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// Width and height of a PNG, JPEG, GIF, BMP or WebP file (what PIL opens here).
fn image_size(b: &[u8]) -> Option<(u32, u32)> {
    let be32 = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
    let le16 = |i: usize| Some(u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?) as u32);
    let le24 = |i: usize| {
        let x = b.get(i..i + 3)?;
        Some(x[0] as u32 | (x[1] as u32) << 8 | (x[2] as u32) << 16)
    };
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Some((be32(16)?, be32(20)?));
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        return Some((le16(6)?, le16(8)?));
    }
    if b.starts_with(b"BM") {
        let w = i32::from_le_bytes(b.get(18..22)?.try_into().ok()?);
        let h = i32::from_le_bytes(b.get(22..26)?.try_into().ok()?);
        return Some((w.unsigned_abs(), h.unsigned_abs()));
    }
    if b.starts_with(b"RIFF") && b.get(8..12) == Some(b"WEBP") {
        return match b.get(12..16)? {
            b"VP8 " => Some((le16(26)? & 0x3fff, le16(28)? & 0x3fff)),
            b"VP8L" => {
                let x = b.get(21..25)?;
                let w = 1 + (((x[1] as u32 & 0x3F) << 8) | x[0] as u32);
                let h = 1
                    + (((x[3] as u32 & 0xF) << 10)
                        | (x[2] as u32) << 2
                        | (x[1] as u32 & 0xC0) >> 6);
                Some((w, h))
            }
            b"VP8X" => Some((1 + le24(24)?, 1 + le24(27)?)),
            _ => None,
        };
    }
    if b.starts_with(&[0xFF, 0xD8]) {
        let mut i = 2;
        while i + 9 < b.len() {
            if b[i] != 0xFF {
                return None;
            }
            let marker = b[i + 1];
            let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
            if (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker) {
                let h = u16::from_be_bytes([b[i + 5], b[i + 6]]) as u32;
                let w = u16::from_be_bytes([b[i + 7], b[i + 8]]) as u32;
                return Some((w, h));
            }
            i += 2 + len;
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// Execution (`main.py` `prompt_worker`, `execution.py` `PromptExecutor.execute_async`)
// ---------------------------------------------------------------------------------------

async fn run_worker(s: Arc<Shared>) {
    loop {
        s.hold_if_dark().await;
        let item = {
            let mut inner = s.inner.lock().unwrap();
            let item = heapq::pop(&mut inner.queue);
            if let Some(item) = &item {
                inner.started.push(item.prompt_id.clone());
                inner.running = Some(item.clone());
            }
            item
        };
        let Some(item) = item else {
            s.work.notified().await;
            continue;
        };
        // `PromptQueue.get` → `queue_updated`.
        s.queue_updated();
        let slow_start = s.faults.lock().unwrap().slow_start;
        tokio::time::sleep(slow_start).await;
        s.hold_if_dark().await;
        let (status, outputs, meta) = run_prompt(&s, &item).await;
        // `task_done`: the history entry (without sensitive extra data), then `status`.
        {
            let mut inner = s.inner.lock().unwrap();
            inner.running = None;
            let mut entry_item = item.clone();
            for k in ["auth_token_comfy_org", "api_key_comfy_org"] {
                entry_item.extra.remove(k);
            }
            if inner.history.len() > 10000 {
                inner.history.remove(0);
            }
            let entry = obj! {
                "prompt" => entry_item.to_j(),
                "outputs" => outputs,
                "status" => status,
                "meta" => meta,
            };
            match inner.history.iter_mut().find(|(k, _)| *k == item.prompt_id) {
                Some(e) => e.1 = entry,
                None => inner.history.push((item.prompt_id.clone(), entry)),
            }
        }
        s.queue_updated();
        if let Some(client) = item.client() {
            s.send(
                "executing",
                obj! {"node" => J::Null, "prompt_id" => &item.prompt_id},
                Some(&client),
            );
        }
    }
}

/// `ExecutionList`: the topological dissolve of the graph.
#[derive(Default)]
struct ExecList {
    pending: Vec<String>,
    block_count: HashMap<String, usize>,
    /// Which nodes each node blocks, in the order the links were added.
    blocking: HashMap<String, Vec<String>>,
}

impl ExecList {
    fn add_node(&mut self, id: &str, prompt: &J, cached: &dyn Fn(&str) -> bool) {
        let mut stack = vec![id.to_string()];
        let mut links = Vec::new();
        while let Some(u) = stack.pop() {
            if self.pending.contains(&u) {
                continue;
            }
            self.pending.push(u.clone());
            self.block_count.insert(u.clone(), 0);
            self.blocking.insert(u.clone(), Vec::new());
            let inputs = prompt.get(&u).and_then(|n| n.get("inputs"));
            for (_, v) in inputs.map(J::entries).unwrap_or(&[]) {
                if let (true, J::Arr(l)) = (is_link(v), v) {
                    let from = l[0].py_str();
                    if prompt.get(&from).is_some() && !cached(&from) {
                        stack.push(from.clone());
                        links.push((from, u.clone()));
                    }
                }
            }
        }
        for (from, to) in links {
            self.add_strong_link(&from, &to, prompt, cached);
        }
    }

    fn add_strong_link(&mut self, from: &str, to: &str, prompt: &J, cached: &dyn Fn(&str) -> bool) {
        if cached(from) {
            return;
        }
        self.add_node(from, prompt, cached);
        let blocked = self.blocking.get_mut(from).unwrap();
        if !blocked.iter().any(|b| b == to) {
            blocked.push(to.to_string());
            *self.block_count.get_mut(to).unwrap() += 1;
        }
    }

    /// `stage_node_execution` with `ux_friendly_pick_node`; `None` on a cycle.
    fn stage(&self, is_output: &dyn Fn(&str) -> bool) -> Option<String> {
        let ready: Vec<&String> = self
            .pending
            .iter()
            .filter(|id| self.block_count[*id] == 0)
            .collect();
        let blocks = |id: &str| self.blocking.get(id).cloned().unwrap_or_default();
        ready
            .iter()
            .find(|id| is_output(id))
            .or_else(|| {
                ready
                    .iter()
                    .find(|id| blocks(id).iter().any(|b| is_output(b)))
            })
            .or_else(|| {
                ready.iter().find(|id| {
                    blocks(id)
                        .iter()
                        .any(|b| blocks(b).iter().any(|c| is_output(c)))
                })
            })
            .or(ready.first())
            .map(|id| id.to_string())
    }

    fn complete(&mut self, id: &str) {
        self.pending.retain(|p| p != id);
        for b in self.blocking.remove(id).unwrap_or_default() {
            if let Some(c) = self.block_count.get_mut(&b) {
                *c -= 1;
            }
        }
    }
}

/// `CacheKeySetInputSignature.get_node_signature` for every node, keyed by node id. Sets
/// `is_changed` on `LoadImage` nodes of the prompt, as `IsChangedCache.get` does.
fn signatures(s: &Shared, prompt: &mut J) -> HashMap<String, String> {
    let ids: Vec<String> = prompt.entries().iter().map(|(k, _)| k.clone()).collect();
    let mut is_changed: HashMap<String, J> = HashMap::new();
    for id in &ids {
        let Some(node) = prompt.get(id) else { continue };
        let value = if let Some(v) = node.get("is_changed") {
            v.clone()
        } else if node.get("class_type").and_then(J::as_str) == Some("LoadImage") {
            let image = node.get("inputs").and_then(|i| i.get("image"));
            let hash = match image {
                Some(J::Str(name)) if !is_link(&J::from(name)) => {
                    std::fs::read(s.annotated_path(name, &s.input_dir))
                        .ok()
                        .map(|b| {
                            use sha2::Digest;
                            hex::encode(sha2::Sha256::digest(&b))
                        })
                }
                _ => None,
            };
            let v = match hash {
                Some(h) => J::Arr(vec![J::Str(h)]),
                None => J::Float(f64::NAN),
            };
            prompt.get_mut(id).unwrap().set("is_changed", v.clone());
            v
        } else {
            J::Bool(false)
        };
        is_changed.insert(id.clone(), value);
    }
    let mut out = HashMap::new();
    for id in &ids {
        let mut ancestors = Vec::new();
        let mut order = HashMap::new();
        ancestry(prompt, id, &mut ancestors, &mut order);
        let mut sig = vec![immediate_signature(prompt, id, &order, &is_changed)];
        for a in &ancestors {
            sig.push(immediate_signature(prompt, a, &order, &is_changed));
        }
        out.insert(id.clone(), J::Arr(sig).hashable());
    }
    out
}

fn sorted_inputs(node: &J) -> Vec<(String, J)> {
    let mut inputs = node.get("inputs").map(J::entries).unwrap_or(&[]).to_vec();
    inputs.sort_by(|a, b| a.0.cmp(&b.0));
    inputs
}

fn ancestry(prompt: &J, id: &str, ancestors: &mut Vec<String>, order: &mut HashMap<String, usize>) {
    let Some(node) = prompt.get(id) else { return };
    for (_, v) in sorted_inputs(node) {
        if let (true, J::Arr(l)) = (is_link(&v), &v) {
            let a = l[0].py_str();
            if !order.contains_key(&a) {
                ancestors.push(a.clone());
                order.insert(a.clone(), ancestors.len() - 1);
                ancestry(prompt, &a, ancestors, order);
            }
        }
    }
}

fn immediate_signature(
    prompt: &J,
    id: &str,
    order: &HashMap<String, usize>,
    is_changed: &HashMap<String, J>,
) -> J {
    let Some(node) = prompt.get(id) else {
        // "This node doesn't exist -- we can't cache it."
        return J::Arr(vec![J::Float(f64::NAN)]);
    };
    let mut sig = vec![
        node.get("class_type").cloned().unwrap_or(J::Null),
        is_changed.get(id).cloned().unwrap_or(J::Bool(false)),
    ];
    for (k, v) in sorted_inputs(node) {
        if let (true, J::Arr(l)) = (is_link(&v), &v) {
            let index = order.get(&l[0].py_str()).copied().unwrap_or(0);
            sig.push(J::Arr(vec![
                J::Str(k),
                J::Arr(vec![J::from("ANCESTOR"), J::from(index), l[1].clone()]),
            ]));
        } else {
            sig.push(J::Arr(vec![J::Str(k), v]));
        }
    }
    J::Arr(sig)
}

/// An input as `get_input_data` hands it to the node.
#[derive(Clone)]
enum Arg {
    Val(Val),
    Const(J),
    /// A link whose output is not there (`None`).
    Missing,
}

impl Arg {
    /// `format_value` for `current_inputs`.
    fn format(&self) -> J {
        match self {
            Arg::Const(v @ (J::Null | J::Bool(_) | J::Int(_) | J::Float(_) | J::Str(_))) => {
                v.clone()
            }
            Arg::Const(other) => J::Str(other.py_str()),
            Arg::Val(v) => J::Str(v.describe()),
            Arg::Missing => J::Null,
        }
    }

    fn int(&self, default: i128) -> i128 {
        match self {
            Arg::Const(J::Int(n)) => *n,
            _ => default,
        }
    }
}

enum NodeErr {
    Interrupted,
    Failed(Exc),
}

/// One prompt's run: `PromptExecutor`'s messages and the progress registry.
struct Run<'a> {
    s: &'a Arc<Shared>,
    prompt_id: String,
    client: Option<String>,
    /// `status_messages`, for the history.
    messages: Vec<J>,
    /// `ProgressRegistry.nodes`: id → `{state, value, max}`.
    progress: Vec<(String, J)>,
    step_time: Duration,
    previews: bool,
}

impl Run<'_> {
    /// `add_message`: with a timestamp, kept for the history, sent to the client (or to
    /// everyone when `broadcast` and there is no client).
    fn add_message(&mut self, event: &str, mut data: J, broadcast: bool) {
        data.set("timestamp", J::Int(now_ms()));
        self.messages
            .push(J::Arr(vec![J::from(event), data.clone()]));
        if self.client.is_some() || broadcast {
            self.s.send(event, data, self.client.as_deref());
        }
    }

    fn send_client(&self, event: &str, data: J) {
        if let Some(c) = &self.client {
            self.s.send(event, data, Some(c));
        }
    }

    fn progress_entry(&mut self, id: &str) -> &mut J {
        if let Some(i) = self.progress.iter().position(|(k, _)| k == id) {
            return &mut self.progress[i].1;
        }
        self.progress.push((
            id.to_string(),
            obj! {"state" => "pending", "value" => 0, "max" => 1},
        ));
        &mut self.progress.last_mut().unwrap().1
    }

    /// `WebUIProgressHandler._send_progress_state`: every started node, to the client
    /// (`sid=None`, everyone, for a prompt without one).
    fn send_progress_state(&self) {
        let mut nodes = obj! {};
        for (id, st) in &self.progress {
            nodes.set(
                id,
                obj! {
                    "value" => st.get("value").cloned(), "max" => st.get("max").cloned(),
                    "state" => st.get("state").cloned(), "node_id" => id,
                    "prompt_id" => &self.prompt_id, "display_node_id" => id,
                    "parent_node_id" => J::Null, "real_node_id" => id,
                },
            );
        }
        self.s.send(
            "progress_state",
            obj! {"prompt_id" => &self.prompt_id, "nodes" => nodes},
            self.client.as_deref(),
        );
    }

    fn start_progress(&mut self, id: &str) {
        let e = self.progress_entry(id);
        e.set("state", J::from("running"));
        e.set("value", J::Float(0.0));
        e.set("max", J::Float(1.0));
        self.send_progress_state();
    }

    fn finish_progress(&mut self, id: &str) {
        let e = self.progress_entry(id);
        e.set("state", J::from("finished"));
        let max = e.get("max").cloned().unwrap_or(J::Int(1));
        e.set("value", max);
        self.send_progress_state();
    }

    fn interrupted(&self) -> bool {
        // `throw_exception_if_processing_interrupted` clears the flag as it raises.
        let mut inner = self.s.inner.lock().unwrap();
        std::mem::take(&mut inner.interrupt)
    }

    /// `hijack_progress`'s hook at a sampler step: interrupt check, `progress_state`,
    /// `progress`, and a preview frame.
    fn step(&mut self, id: &str, value: u64, max: u64) -> Result<(), NodeErr> {
        if self.interrupted() {
            return Err(NodeErr::Interrupted);
        }
        let e = self.progress_entry(id);
        e.set("state", J::from("running"));
        e.set("value", J::from(value));
        e.set("max", J::from(max));
        self.send_progress_state();
        let metadata = self.previews && self.s.supports_preview_metadata(self.client.as_deref());
        if metadata {
            let meta = obj! {
                "node_id" => id, "prompt_id" => &self.prompt_id, "display_node_id" => id,
                "parent_node_id" => J::Null, "real_node_id" => id, "image_type" => "image/jpeg",
            }
            .dump();
            let mut payload = (meta.len() as u32).to_be_bytes().to_vec();
            payload.extend_from_slice(meta.as_bytes());
            payload.extend_from_slice(PREVIEW_JPEG);
            // BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA
            self.s.send_bytes(4, &payload, self.client.as_deref());
        }
        self.s.send(
            "progress",
            obj! {"value" => value, "max" => max, "prompt_id" => &self.prompt_id, "node" => id},
            self.client.as_deref(),
        );
        if self.previews && !metadata {
            // `send_image`: `>I` 1 (JPEG), then the image, as BinaryEventTypes.PREVIEW_IMAGE.
            let mut payload = 1u32.to_be_bytes().to_vec();
            payload.extend_from_slice(PREVIEW_JPEG);
            self.s.send_bytes(1, &payload, self.client.as_deref());
        }
        Ok(())
    }

    /// A wait that an interrupt ends (a sampler or a hung node between checks).
    async fn tick(&self) {
        tokio::time::sleep(self.step_time.max(Duration::from_millis(1))).await;
        self.s.hold_if_dark().await;
    }
}

fn not_an_image(arg: &Arg) -> NodeErr {
    let ty = match arg {
        Arg::Missing => "NoneType".to_string(),
        Arg::Const(v) => v.type_name().to_string(),
        Arg::Val(_) => "dict".to_string(),
    };
    let msg = if ty == "str" {
        "'str' object has no attribute 'shape'".to_string()
    } else {
        format!("'{ty}' object is not subscriptable")
    };
    NodeErr::Failed(exc("TypeError", msg))
}

/// `(status, outputs, meta)` of the history entry.
async fn run_prompt(s: &Arc<Shared>, item: &Item) -> (J, J, J) {
    let options = s.options.lock().unwrap().clone();
    let faults = s.faults.lock().unwrap().clone();
    let client = item.client();
    {
        let mut inner = s.inner.lock().unwrap();
        // `nodes.interrupt_processing(False)`: an interrupt before the start is lost.
        inner.interrupt = false;
        inner.client_id = client.clone();
    }
    let mut run = Run {
        s,
        prompt_id: item.prompt_id.clone(),
        client,
        messages: Vec::new(),
        progress: Vec::new(),
        step_time: s.config.step_time,
        previews: options.previews,
    };
    run.add_message(
        "execution_start",
        obj! {"prompt_id" => &item.prompt_id},
        false,
    );
    // The prompt as the nodes see it (`is_changed` set, PNG metadata from it).
    let mut prompt = item.prompt.clone();
    let sigs = signatures(s, &mut prompt);
    let ids: Vec<String> = prompt.entries().iter().map(|(k, _)| k.clone()).collect();
    let cached_nodes: Vec<String> = {
        let mut inner = s.inner.lock().unwrap();
        let caches = &mut inner.caches;
        if options.cache {
            // `clean_unused`: only what this prompt uses is kept.
            let used: HashSet<&String> = sigs.values().collect();
            caches.outputs.retain(|k, _| used.contains(k));
            caches.ui.retain(|k, _| used.contains(k));
            caches.objects.retain(|(id, class), _| {
                prompt
                    .get(id)
                    .and_then(|n| n.get("class_type"))
                    .and_then(J::as_str)
                    == Some(class.as_str())
            });
        } else {
            *caches = Caches::default();
        }
        ids.iter()
            .filter(|id| caches.outputs.contains_key(&sigs[*id]))
            .cloned()
            .collect()
    };
    run.add_message(
        "execution_cached",
        obj! {"nodes" => cached_nodes, "prompt_id" => &item.prompt_id},
        false,
    );
    let is_cached = |id: &str| {
        sigs.get(id)
            .is_some_and(|sig| s.inner.lock().unwrap().caches.outputs.contains_key(sig))
    };
    let class_of = |id: &str| -> String {
        prompt
            .get(id)
            .and_then(|n| n.get("class_type"))
            .map(J::py_str)
            .unwrap_or_default()
    };
    let is_output = |id: &str| s.class_def(&class_of(id)).is_some_and(|d| d.output_node);
    let mut list = ExecList::default();
    for o in &item.outputs {
        list.add_node(o, &prompt, &is_cached);
    }
    let mut executed: Vec<String> = Vec::new();
    let mut success = true;
    let mut failure: Option<(String, NodeErr, J)> = None;
    let mut first_run = true;
    while !list.pending.is_empty() {
        let Some(id) = list.stage(&is_output) else {
            let blamed = list.pending[0].clone();
            failure = Some((
                blamed,
                NodeErr::Failed(exc(
                    "graph.DependencyCycleError",
                    "Dependency cycle detected",
                )),
                J::Arr(vec![]),
            ));
            break;
        };
        let class = class_of(&id);
        let sig = sigs[&id].clone();
        // A cached node: its earlier UI output again, to the client; nothing runs.
        let cached_ui = {
            let inner = s.inner.lock().unwrap();
            inner
                .caches
                .outputs
                .contains_key(&sig)
                .then(|| inner.caches.ui.get(&sig).cloned())
        };
        if let Some(ui) = cached_ui {
            let output = ui.and_then(|u| u.get("output").cloned()).unwrap_or(J::Null);
            run.send_client(
                "executed",
                obj! {"node" => &id, "display_node" => &id, "output" => output, "prompt_id" => &item.prompt_id},
            );
            run.finish_progress(&id);
            success = true;
            list.complete(&id);
            continue;
        }
        run.start_progress(&id);
        let def = s.class_def(&class);
        let node = prompt.get(&id).cloned().unwrap_or(J::Null);
        // `get_input_data`: links from the output cache, declared constants.
        let mut args: Vec<(String, Arg)> = Vec::new();
        for (k, v) in node.get("inputs").map(J::entries).unwrap_or(&[]) {
            if let (true, J::Arr(l)) = (is_link(v), v) {
                let from_sig = sigs.get(&l[0].py_str());
                let index = l[1].num().unwrap_or(0.0) as i64;
                let value = from_sig.and_then(|fs| {
                    let inner = s.inner.lock().unwrap();
                    inner
                        .caches
                        .outputs
                        .get(fs)
                        .and_then(|o| usize::try_from(index).ok().and_then(|i| o.get(i)))
                        .cloned()
                });
                args.push((k.clone(), value.map(Arg::Val).unwrap_or(Arg::Missing)));
            } else if def.as_ref().is_some_and(|d| d.find(k).is_some()) {
                args.push((k.clone(), Arg::Const(v.clone())));
            }
        }
        if let Some(c) = &run.client {
            s.inner.lock().unwrap().last_node_id = Some(id.clone());
            s.send(
                "executing",
                obj! {"node" => &id, "display_node" => &id, "prompt_id" => &item.prompt_id},
                Some(c),
            );
        }
        let hang = faults.hang && first_run;
        first_run = false;
        let result = call_node(
            &mut run,
            &id,
            &class,
            &args,
            &prompt,
            &item.extra,
            &faults,
            hang,
        )
        .await;
        match result {
            Ok((outputs, ui)) => {
                if !ui.entries().is_empty() {
                    let entry = obj! {
                        "meta" => obj! {"node_id" => &id, "display_node" => &id, "parent_node" => J::Null, "real_node_id" => &id},
                        "output" => ui.clone(),
                    };
                    s.inner.lock().unwrap().caches.ui.insert(sig.clone(), entry);
                    run.send_client(
                        "executed",
                        obj! {"node" => &id, "display_node" => &id, "output" => ui, "prompt_id" => &item.prompt_id},
                    );
                }
                s.inner.lock().unwrap().caches.outputs.insert(sig, outputs);
                run.finish_progress(&id);
                executed.push(id.clone());
                success = true;
                list.complete(&id);
            }
            Err(e) => {
                success = false;
                let mut inputs = obj! {};
                for (k, a) in &args {
                    inputs.set(k, J::Arr(vec![a.format()]));
                }
                if def.as_ref().is_some_and(|d| d.hidden_prompt) {
                    inputs.set("prompt", J::Arr(vec![J::Str(prompt.repr())]));
                    inputs.set(
                        "extra_pnginfo",
                        J::Arr(vec![
                            item.extra
                                .get("extra_pnginfo")
                                .map(|x| J::Str(x.repr()))
                                .unwrap_or(J::Null),
                        ]),
                    );
                }
                failure = Some((id.clone(), e, inputs));
                break;
            }
        }
    }
    match failure {
        // `handle_execution_error`.
        Some((node_id, NodeErr::Interrupted, _)) => {
            let class = class_of(&node_id);
            run.add_message(
                "execution_interrupted",
                obj! {"prompt_id" => &item.prompt_id, "node_id" => node_id, "node_type" => class, "executed" => executed},
                true,
            );
        }
        Some((node_id, NodeErr::Failed(e), inputs)) => {
            let class = class_of(&node_id);
            let message = if e.ty == "graph.DependencyCycleError" {
                e.msg
            } else {
                format!("{}\n", e.msg)
            };
            run.add_message(
                "execution_error",
                obj! {
                    "prompt_id" => &item.prompt_id, "node_id" => node_id, "node_type" => class,
                    "executed" => executed, "exception_message" => message,
                    "exception_type" => e.ty, "traceback" => J::Arr(vec![]),
                    "current_inputs" => inputs, "current_outputs" => ids.clone(),
                },
                false,
            );
        }
        None => run.add_message(
            "execution_success",
            obj! {"prompt_id" => &item.prompt_id},
            false,
        ),
    }
    let (mut outputs, mut meta) = (obj! {}, obj! {});
    {
        let mut inner = s.inner.lock().unwrap();
        for id in &ids {
            if let Some(ui) = inner.caches.ui.get(&sigs[id]) {
                outputs.set(id, ui.get("output").cloned().unwrap_or(J::Null));
                meta.set(id, ui.get("meta").cloned().unwrap_or(J::Null));
            }
        }
        inner.last_node_id = None;
        if std::mem::take(&mut inner.unload) {
            inner.loaded = None;
        }
    }
    let status = obj! {
        "status_str" => if success { "success" } else { "error" },
        "completed" => success,
        "messages" => J::Arr(run.messages),
    };
    (status, outputs, meta)
}

#[allow(clippy::too_many_arguments)]
async fn call_node(
    run: &mut Run<'_>,
    id: &str,
    class: &str,
    args: &[(String, Arg)],
    prompt: &J,
    extra: &J,
    faults: &Faults,
    hang: bool,
) -> Result<(Vec<Val>, J), NodeErr> {
    let s = run.s;
    // `before_node_execution`.
    if run.interrupted() {
        return Err(NodeErr::Interrupted);
    }
    if hang {
        loop {
            run.tick().await;
            if run.interrupted() {
                return Err(NodeErr::Interrupted);
            }
        }
    }
    if faults.fail_class.as_deref() == Some(class) {
        return Err(NodeErr::Failed(exc("RuntimeError", "injected failure")));
    }
    let arg = |k: &str| {
        args.iter()
            .find(|(n, _)| n == k)
            .map(|(_, a)| a.clone())
            .unwrap_or(Arg::Missing)
    };
    let images = |k: &str| match arg(k) {
        Arg::Val(Val::Image(frames)) => Ok(frames),
        other => Err(not_an_image(&other)),
    };
    let opaque =
        |kinds: &[&'static str]| Ok((kinds.iter().map(|k| Val::Opaque(k)).collect(), obj! {}));
    match class {
        "EmptyImage" => {
            let (w, h) = (arg("width").int(512), arg("height").int(512));
            let (batch, color) = (arg("batch_size").int(1), arg("color").int(0));
            let channel = |shift: i128| (((color >> shift) & 0xFF) as f64 / 255.0) as f32;
            let frame = Frame {
                w: w as u32,
                h: h as u32,
                rgb: [channel(16), channel(8), channel(0)],
            };
            Ok((
                vec![Val::Image(vec![frame; batch.max(1) as usize])],
                obj! {},
            ))
        }
        "ImageInvert" => {
            let frames = images("image")?;
            let inverted = frames
                .into_iter()
                .map(|f| Frame {
                    rgb: f.rgb.map(|c| 1.0f32 - c),
                    ..f
                })
                .collect();
            Ok((vec![Val::Image(inverted)], obj! {}))
        }
        "LoadImage" => {
            let name = match arg("image") {
                Arg::Const(v) => v.py_str(),
                _ => String::new(),
            };
            let path = s.annotated_path(&name, &s.input_dir);
            let path_s = path.to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).map_err(|_| {
                NodeErr::Failed(exc(
                    "FileNotFoundError",
                    format!("[Errno 2] No such file or directory: {}", str_repr(&path_s)),
                ))
            })?;
            let (w, h) = image_size(&bytes).ok_or_else(|| {
                NodeErr::Failed(exc(
                    "PIL.UnidentifiedImageError",
                    format!("cannot identify image file {}", str_repr(&path_s)),
                ))
            })?;
            let grey = 128.0f32 / 255.0;
            Ok((
                vec![
                    Val::Image(vec![Frame {
                        w,
                        h,
                        rgb: [grey; 3],
                    }]),
                    Val::Opaque("MASK"),
                ],
                obj! {},
            ))
        }
        "SaveImage" | "PreviewImage" => {
            let frames = images("images")?;
            let Some(first) = frames.first().cloned() else {
                return Err(NodeErr::Failed(exc(
                    "IndexError",
                    "index 0 is out of bounds for dimension 0 with size 0",
                )));
            };
            let (dir, folder_type, append, level) = if class == "SaveImage" {
                (s.output_dir.clone(), "output", String::new(), 4)
            } else {
                // `PreviewImage.__init__`: a prefix drawn once per node object.
                let mut inner = s.inner.lock().unwrap();
                let key = (id.to_string(), class.to_string());
                let append = inner
                    .caches
                    .objects
                    .entry(key)
                    .or_insert_with(temp_suffix)
                    .clone();
                (s.temp_dir.clone(), "temp", append, 1)
            };
            let prefix = match arg("filename_prefix") {
                Arg::Const(v) if class == "SaveImage" => v.py_str(),
                _ => "ComfyUI".to_string(),
            };
            let target = save_path(&format!("{prefix}{append}"), &dir, first.w, first.h)
                .map_err(NodeErr::Failed)?;
            // Choosing the counter and writing are apart, where pods sharing a folder race.
            tokio::time::sleep(Duration::from_millis(2)).await;
            let mut texts = vec![("prompt".to_string(), prompt.dump())];
            for (k, v) in extra.get("extra_pnginfo").map(J::entries).unwrap_or(&[]) {
                texts.push((k.clone(), v.dump()));
            }
            // Not ComfyUI's: which prompt, node and pod wrote the file, for tests that check
            // no output was overwritten (read the bytes lossily).
            texts.push((
                "fake_comfyui".to_string(),
                format!(
                    "fake-image prompt={} node={id} pod={}",
                    run.prompt_id, s.name
                ),
            ));
            let mut results = Vec::new();
            for (batch_number, frame) in frames.iter().enumerate() {
                let name = target
                    .filename
                    .replace("%batch_num%", &batch_number.to_string());
                let file = format!("{name}_{:05}_.png", target.counter + batch_number as i128);
                std::fs::write(
                    posix::join(&target.folder, &file),
                    png(frame, level, &texts),
                )
                .map_err(|e| NodeErr::Failed(exc("OSError", e.to_string())))?;
                results.push(obj! {"filename" => file, "subfolder" => &target.subfolder, "type" => folder_type});
            }
            Ok((vec![], obj! {"images" => results}))
        }
        "CheckpointLoaderSimple" | "UNETLoader" => {
            let key = if class == "UNETLoader" {
                "unet_name"
            } else {
                "ckpt_name"
            };
            if let Arg::Const(J::Str(name)) = arg(key) {
                let switch = s.inner.lock().unwrap().loaded.as_deref() != Some(name.as_str());
                if switch {
                    tokio::time::sleep(s.config.switch_penalty).await;
                    let mut inner = s.inner.lock().unwrap();
                    inner.loaded = Some(name);
                    inner.switches += 1;
                }
            }
            if class == "UNETLoader" {
                opaque(&["MODEL"])
            } else {
                opaque(&["MODEL", "CLIP", "VAE"])
            }
        }
        "VAELoader" => opaque(&["VAE"]),
        "LoraLoader" => opaque(&["MODEL", "CLIP"]),
        "CLIPTextEncode" => opaque(&["CONDITIONING"]),
        "EmptyLatentImage" => Ok((
            vec![Val::Latent {
                w: arg("width").int(512) as u32,
                h: arg("height").int(512) as u32,
                batch: arg("batch_size").int(1) as u32,
            }],
            obj! {},
        )),
        "KSampler" | "KSamplerAdvanced" => {
            let steps = arg("steps").int(20).max(1) as u64;
            let latent = match arg("latent_image") {
                Arg::Val(v @ Val::Latent { .. }) => v,
                _ => Val::Latent {
                    w: 512,
                    h: 512,
                    batch: 1,
                },
            };
            for step in 1..=steps {
                run.tick().await;
                run.step(id, step, steps)?;
            }
            Ok((vec![latent], obj! {}))
        }
        "VAEDecode" => {
            let (w, h, batch) = match arg("samples") {
                Arg::Val(Val::Latent { w, h, batch }) => (w, h, batch),
                _ => (512, 512, 1),
            };
            let grey = 0.5f32;
            Ok((
                vec![Val::Image(vec![
                    Frame {
                        w,
                        h,
                        rgb: [grey; 3]
                    };
                    batch.max(1) as usize
                ])],
                obj! {},
            ))
        }
        _ => opaque(&["*"]),
    }
}

/// `"_temp_" + ''.join(random.choice("abcdefghijklmnopqrstupvxyz") for x in range(5))`
/// (ComfyUI's alphabet: "p" twice, no "w").
fn temp_suffix() -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstupvxyz";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let picked: String = bytes[..5]
        .iter()
        .map(|b| LETTERS[*b as usize % LETTERS.len()] as char)
        .collect();
    format!("_temp_{picked}")
}

struct SaveTarget {
    folder: String,
    filename: String,
    counter: i128,
    subfolder: String,
}

/// `folder_paths.get_save_image_path`.
fn save_path(prefix: &str, output_dir: &str, width: u32, height: u32) -> Result<SaveTarget, Exc> {
    let mut prefix = prefix.to_string();
    if prefix.contains('%') {
        let now = jiff::ZonedDateTime::now();
        for (k, v) in [
            ("%width%", width.to_string()),
            ("%height%", height.to_string()),
            ("%year%", now.year().to_string()),
            ("%month%", format!("{:02}", now.month())),
            ("%day%", format!("{:02}", now.day())),
            ("%hour%", format!("{:02}", now.hour())),
            ("%minute%", format!("{:02}", now.minute())),
            ("%second%", format!("{:02}", now.second())),
        ] {
            prefix = prefix.replace(k, &v);
        }
    }
    let norm = posix::normpath(&prefix);
    let subfolder = posix::dirname(&norm);
    let filename = posix::basename(&norm).to_string();
    let folder = posix::join(output_dir, &subfolder);
    let common = posix::commonpath(output_dir, &posix::abspath(&folder));
    if common != output_dir {
        return Err(exc(
            "Exception",
            format!(
                "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {}\n         output_dir: {output_dir}\n         commonpath: {common}",
                posix::abspath(&folder)
            ),
        ));
    }
    // `map_filename` measures with the prefix as given (not normalised).
    let prefix_len = posix::basename(&prefix).chars().count();
    let counter = match std::fs::read_dir(&folder) {
        Err(_) => {
            std::fs::create_dir_all(&folder).map_err(|e| exc("OSError", e.to_string()))?;
            1
        }
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| {
                let name: Vec<char> = e.file_name().to_string_lossy().chars().collect();
                let head: String = name.iter().take(prefix_len + 1).collect();
                let rest: String = name.iter().skip(prefix_len + 1).collect();
                let digits = py_int_text(rest.split('_').next().unwrap_or("")).unwrap_or(0);
                let ok = head.ends_with('_') && head[..head.len() - 1] == filename;
                ok.then_some(digits)
            })
            .max()
            .map(|d| d + 1)
            .unwrap_or(1),
    };
    Ok(SaveTarget {
        folder,
        filename,
        counter,
        subfolder,
    })
}
