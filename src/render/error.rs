//! Why a spec cannot be built.

/// A spec the schema let through but the controller cannot build (e.g. an object stored
/// before a CEL rule existed). Each variant becomes a status reason.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("the resource has no namespace")]
    NoNamespace,
    #[error("{field}: {message}")]
    InvalidSpec { field: String, message: String },
}
