//! The IPVS datapath, for kernels without the cgroup socket hooks the eBPF datapath needs:
//! the same `Desired`, programmed into IPVS the way Docker does it (a firewall mark per VIP
//! in each container namespace, one fwmark service per load balancer, real servers for
//! its tasks), as differences.
//!
//! - `applier`: `Desired` into every local sandbox's table and marks, for what changed.
//! - `dns_handback`: the helper that removes the DNS redirects if meshd dies.
//! - `dns_redirect`: the nftables table that sends a sandbox's DNS to meshd's sockets.
//! - `marks`: the nftables table that marks connections to a VIP for IPVS.
//! - `netlink`: the IPVS generic netlink family, typed.
//! - `plan`: what to change in one namespace's IPVS table, from what is there to what
//!   should be (pure).
//! - `socket`: a netlink socket to one namespace's IPVS.
pub mod applier;
pub mod dns_handback;
pub mod dns_redirect;
pub mod marks;
pub mod netlink;
pub mod plan;
pub mod socket;
