//! OCI and Docker images for ferry: pulling an image's manifest, config and
//! layers from any v2 registry ([`registry`]), reading the image config
//! ([`config`]), and applying the layers to a directory tree as an unprivileged
//! user ([`layers`]), with the ownership, modes, xattrs and device nodes the
//! layers ask for kept aside and written into the ext4 image afterwards
//! ([`fixups`]).
//!
//! Everything a registry sends is untrusted: manifests and configs are bounded
//! and digest-checked, blobs are verified against their digests, and layer
//! entries can never write outside the tree.

pub mod auth;
pub mod config;
pub mod error;
pub mod fixups;
pub mod layers;
pub mod reference;
pub mod registry;

pub use config::ImageSpec;
pub use error::OciError;
pub use reference::ImageRef;
pub use registry::{pull, PullOptions, PullProgress, Pulled};
