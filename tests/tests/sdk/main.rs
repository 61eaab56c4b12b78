//! The SDK against the real gateway, in one test binary (linked once instead of once
//! per file); nextest runs each test in its own process.

mod sdk_fallback;
mod sdk_gateway;
mod sdk_tls;
