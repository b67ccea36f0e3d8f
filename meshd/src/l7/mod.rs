//! The L7 front end: HTTP(S) routed by host name from Interlock's `com.docker.lb.*`
//! service labels.
//!
//! - `labels`: one service's labels read into a `RouteSpec` (pure, strict).
//! - `compile::l7` turns the specs and the tasks into `Desired` routes, like everything else.
pub mod labels;
