//! The gateway's black-box tests, one module per area, in one test binary: linked
//! once instead of once per file (each link pulls in the whole gateway), which is most
//! of what a test build costs on CI's two cores. nextest still runs every test in its
//! own process, so no test sees another's state.

mod common;

mod api_errors;
mod batch;
mod cluster;
mod config_cli;
mod delivery;
mod hostile;
mod observability;
mod openapi;
mod postgres_tls;
mod process;
mod properties;
mod push_apns;
mod push_e2e;
mod push_fcm_mock;
mod security;
mod shutdown;
mod store_conformance;
mod transports;
mod trusted_proxies;
mod webhooks;
