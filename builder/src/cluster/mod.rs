//! What a cluster image carries besides k3s itself: each inventory node's configuration rendered
//! into the root at build time ([`render`]), the cluster secret ([`token`]), the services and
//! their accounts, modules and init entries ([`services`]), and the boot step
//! `boot.d/35-identity.sh` that picks the node on the device ([`identity`] tests it). The
//! `cluster` key's types and checks are in `profile::cluster`.

pub mod render;
pub mod services;
pub mod token;
pub mod yaml;

pub use render::{files, render, RenderedFile};
pub use token::Token;
