//! The pure core: object identity, normalization, typed references, the
//! application graph and selection. No I/O: values in, values out.

pub mod edges;
pub mod graph;
pub mod names;
pub mod namespace_fields;
pub mod normalize;
pub mod object;
pub mod select;

pub use object::{GroupKind, ModelError, ObjectRef};
