//! What a cluster image carries besides k3s itself: each inventory node's configuration rendered
//! into the root at build time ([`render`]), the cluster secret ([`token`]), the services and
//! their accounts, modules and init entries ([`services`]), and the boot step
//! `boot.d/35-identity.sh` that picks the node on the device ([`identity`] tests it). The
//! `cluster` key's types and checks are in `profile::cluster`. Its secrets (the token, the
//! etcd group's PKI in [`pki`]) are kept in the output's `secrets/` directory ([`secrets`]).

pub mod pki;
pub mod render;
pub mod secrets;
pub mod services;
pub mod token;
pub mod yaml;

pub use render::{files, render, RenderedFile};
pub use token::Token;

/// A cluster's secrets for one build: the token, the PKI when the cluster has etcd members, and
/// the rollout master key when the profile has `update.server` (`crate::rollout`).
#[derive(Debug, Clone)]
pub struct Secrets {
    pub token: Token,
    pub pki: Option<pki::Pki>,
    pub rollout: Option<[u8; 32]>,
}
