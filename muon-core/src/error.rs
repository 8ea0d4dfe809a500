//! The error type of the public boundary.

use alloc::string::String;
use core::fmt;

use crate::Shape;

/// What went wrong, and where. Every public entry point that users feed returns this rather
/// than panicking.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// A tensor's shape does not match what it must be.
    ShapeMismatch {
        /// Which tensor, e.g. `"gradient of blocks.3.attn.wq"`.
        what: String,
        /// The shape it must have.
        expected: Shape,
        /// The shape it has.
        found: Shape,
    },
    /// A list has the wrong number of entries (parameters, gradients, state entries).
    CountMismatch {
        /// Which list.
        what: &'static str,
        /// How many there must be.
        expected: usize,
        /// How many there are.
        found: usize,
    },
    /// A gradient holds NaN or Inf (or its squared norm overflows the element type). The step
    /// was refused: parameters and optimizer state are unchanged.
    NonFiniteGradient {
        /// Position of the parameter in the optimizer's list.
        index: usize,
        /// Its name.
        name: String,
    },
    /// A matrix with no elements where one is needed.
    EmptyMatrix {
        /// Which tensor.
        what: String,
    },
    /// A configuration value that cannot work; the message names the field.
    InvalidConfig(String),
    /// Saved optimizer state that does not fit this optimizer.
    InvalidState(String),
    /// A failure inside a backend (device allocation, kernel launch, driver missing...).
    Backend(String),
    /// A failure of communication between ranks (a rank left the group, ranks that disagree
    /// on a tensor's length, an error of the communication library).
    Collective(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ShapeMismatch {
                what,
                expected,
                found,
            } => write!(f, "shape mismatch for {what}: expected {expected}, found {found}"),
            Error::CountMismatch {
                what,
                expected,
                found,
            } => write!(f, "expected {expected} {what}, found {found}"),
            Error::NonFiniteGradient { index, name } => write!(
                f,
                "non-finite gradient (NaN or Inf) for parameter #{index} `{name}`; the step was refused and nothing changed"
            ),
            Error::EmptyMatrix { what } => write!(f, "{what} is empty (a dimension is 0)"),
            Error::InvalidConfig(msg) => write!(f, "invalid configuration: {msg}"),
            Error::InvalidState(msg) => write!(f, "invalid optimizer state: {msg}"),
            Error::Backend(msg) => write!(f, "backend error: {msg}"),
            Error::Collective(msg) => write!(f, "collective error: {msg}"),
        }
    }
}

impl core::error::Error for Error {}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = core::result::Result<T, E>;
