//! Socket-level load balancing for service VIPs.
//!
//! `connect4` and `sendmsg4` rewrite a VIP destination to a backend picked from the VIP's
//! live backends, once per socket: no per-packet NAT, no conntrack entry, nothing to time
//! out. `recvmsg4` and `getpeername4` translate the backend back to the VIP so the
//! application only ever sees the address it asked for. The caller's network-namespace
//! cookie names the networks it is attached to, and a VIP is looked up on those only: only
//! containers attached to the VIP's network see it, and sockets in namespaces meshd does not
//! know pass through untouched.
//!
//! The same hooks send `127.0.0.11:53` to meshd's DNS sockets in the caller's namespace
//! (`DNS`), and show the answers as coming from port 53; only while those sockets exist, so
//! a dead meshd leaves containers to dockerd's resolver instead of to nothing.
#![no_std]
#![no_main]
// `atomic_xadd`: the bpf target has no compare-and-swap, so `AtomicU64::fetch_add` is not
// offered there, while the kernel's atomic add is (aya's maintainers point here too).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod ingress;

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, BPF_F_NO_PREALLOC,
    },
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_lookup_udp,
        bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap},
    programs::SockAddrContext,
};
use meshd_common::{
    capacity, mix64, AffinityKey, AffinityValue, BackendSlot, BackendValue, DnsPorts,
    LbMeta, LbValue, NetMeta, RevNatKey, RevNatValue, SandboxValue, VipKey, VipValue, DNS_ADDR,
    DNS_PORT, MAX_SANDBOX_NETS,
};

#[map(name = "MESHD_SANDBOX")]
static SANDBOXES: HashMap<u64, SandboxValue> =
    HashMap::pinned(capacity::SANDBOXES, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_VIPS")]
static VIPS: HashMap<VipKey, VipValue> = HashMap::pinned(capacity::VIPS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_LBS")]
static LBS: HashMap<u32, LbValue> = HashMap::pinned(capacity::LBS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_BACKENDS")]
static BACKENDS: HashMap<BackendSlot, BackendValue> =
    HashMap::pinned(capacity::BACKENDS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_REVNAT")]
static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(capacity::REVNAT, 0);

#[map(name = "MESHD_AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(capacity::AFFINITY, 0);

#[map(name = "MESHD_BE_CONNS")]
static BACKEND_CONNS: Array<u64> = Array::pinned(capacity::BACKENDS, 0);

#[map(name = "MESHD_LB_CONNS")]
static LB_CONNS: Array<u64> = Array::pinned(capacity::LBS, 0);

/// Read only by userspace (they map ids back to Docker objects after a restart); declared
/// here so they are created and pinned with the others.
#[map(name = "MESHD_LB_META")]
static LB_META: HashMap<u32, LbMeta> = HashMap::pinned(capacity::LBS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_NET_META")]
static NET_META: HashMap<u32, NetMeta> = HashMap::pinned(capacity::NETWORKS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_DNS")]
static DNS: HashMap<u64, DnsPorts> = HashMap::pinned(capacity::DNS, BPF_F_NO_PREALLOC);

const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
/// `BPF_F_CURRENT_NETNS`: look the socket up in the caller's namespace.
const CURRENT_NETNS: u64 = u64::MAX;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn meshd_connect4(ctx: SockAddrContext) -> i32 {
    balance(ctx.sock_addr, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn meshd_sendmsg4(ctx: SockAddrContext) -> i32 {
    balance(ctx.sock_addr, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn meshd_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(ctx.sock_addr);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn meshd_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(ctx.sock_addr);
    ALLOW
}

/// The load balancer `vip` names in this sandbox: the first of its networks that has it.
#[inline(always)]
fn find_lb(netns_cookie: u64, vip: u32) -> Option<u32> {
    let sb = SANDBOXES.get_ptr(&netns_cookie)?;
    // SAFETY: a pointer the map lookup just returned.
    let count = unsafe { (*sb).count } as usize;
    for i in 0..MAX_SANDBOX_NETS {
        if i >= count {
            break;
        }
        let key = VipKey {
            net: unsafe { (*sb).nets[i] },
            ip: vip,
        };
        if let Some(v) = VIPS.get_ptr(&key) {
            return Some(unsafe { (*v).lb_id });
        }
    }
    None
}

/// `datagram`: an unconnected UDP send, which passes here for every datagram; it keeps the
/// backend it had while that backend is live, as a connected socket would.
#[inline(always)]
fn balance(sa: *mut bpf_sock_addr, datagram: bool) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let (vip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    let netns_cookie = unsafe { bpf_get_netns_cookie(sa.cast()) };
    if vip == u32::from_ne_bytes(DNS_ADDR) && port == DNS_PORT.to_be() {
        redirect_dns(sa, netns_cookie, vip, port);
        return ALLOW;
    }
    let Some(lb_id) = find_lb(netns_cookie, vip) else {
        return ALLOW;
    };
    let Some(lb) = LBS.get_ptr(&lb_id) else {
        return ALLOW;
    };
    let (lb_vip, count) = unsafe { ((*lb).vip, (*lb).count) };
    if lb_vip != vip {
        // A stale VIP entry naming a reused id: never another service's backends.
        return ALLOW;
    }
    if count == 0 {
        // A VIP with no live task: fail the connect at once instead of letting it time out.
        return DENY;
    }
    let socket_cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let aff_key = AffinityKey {
        socket_cookie,
        vip,
        port,
        _pad: 0,
    };
    let mut backend_ip = 0u32;
    let mut counter = 0u32;
    if datagram {
        if let Some(a) = AFFINITY.get_ptr(&aff_key) {
            let (a_lb, a_index, a_ip) = unsafe { ((*a).lb_id, (*a).index, (*a).ip) };
            // Still a backend: the slot it had (below the live count) still holds it.
            if a_lb == lb_id && a_index < count {
                if let Some(b) = BACKENDS.get_ptr(&BackendSlot { lb_id, index: a_index }) {
                    if unsafe { (*b).ip } == a_ip {
                        backend_ip = a_ip;
                    }
                }
            }
        }
    }
    let fresh = backend_ip == 0;
    if fresh {
        let index = (mix64(socket_cookie ^ ((vip as u64) << 32)) % count as u64) as u32;
        let Some(backend) = BACKENDS.get_ptr(&BackendSlot { lb_id, index }) else {
            return ALLOW;
        };
        backend_ip = unsafe { (*backend).ip };
        counter = unsafe { (*backend).counter };
        if datagram {
            let _ = AFFINITY.insert(
                &aff_key,
                &AffinityValue {
                    lb_id,
                    index,
                    ip: backend_ip,
                    _pad: 0,
                },
                0,
            );
        }
    }
    unsafe { (*sa).user_ip4 = backend_ip };

    let rev_key = RevNatKey {
        socket_cookie,
        ip: backend_ip,
        port,
        _pad: 0,
    };
    let rev = RevNatValue {
        ip: vip,
        port,
        _pad: 0,
    };
    remember_reverse(&rev_key, &rev);

    if fresh {
        // One shared counter per slot, added to atomically: a connect is not a per-packet
        // path, and per-CPU arrays would cost (8 B × CPUs) per slot of kernel memory, which
        // on a 64-CPU node is 128 MB for the backend slots alone. Userspace zeroes a slot
        // before it hands it out.
        if let Some(count) = LB_CONNS.get_ptr_mut(lb_id) {
            count_one(count);
        }
        if let Some(count) = BACKEND_CONNS.get_ptr_mut(counter) {
            count_one(count);
        }
    }
    ALLOW
}

/// An atomic add whose result is unused: the plain `BPF_XADD`, on every kernel.
#[inline(always)]
pub(crate) fn count_one(count: *mut u64) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};
    // SAFETY: the pointer is a live map value of 8 aligned bytes, from `get_ptr_mut`.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, 1) };
}

/// `127.0.0.11:53` → meshd's socket for this namespace, when meshd serves it; otherwise the
/// query goes where it would have gone (dockerd's resolver).
#[inline(always)]
fn redirect_dns(sa: *mut bpf_sock_addr, netns_cookie: u64, ip: u32, port: u16) {
    let Some(ports) = DNS.get_ptr(&netns_cookie) else {
        return;
    };
    let stream = unsafe { (*sa).type_ == SOCK_STREAM };
    let to = unsafe {
        if stream {
            (*ports).tcp
        } else {
            (*ports).udp
        }
    };
    if to == 0 || !listening(sa, ip, to, stream) {
        // meshd is gone (a crash; a clean stop removes the entry): dockerd answers meanwhile.
        return;
    }
    unsafe { (*sa).user_port = to as u32 };
    let rev_key = RevNatKey {
        socket_cookie: unsafe { bpf_get_socket_cookie(sa.cast()) },
        ip,
        port: to,
        _pad: 0,
    };
    let rev = RevNatValue { ip, port, _pad: 0 };
    remember_reverse(&rev_key, &rev);
}

/// Records how to show a translated peer to the application. An unconnected UDP socket
/// passes here on every send: writing an LRU entry takes a lock with interrupts off, so it
/// is written only when missing or different.
#[inline(always)]
fn remember_reverse(key: &RevNatKey, value: &RevNatValue) {
    if let Some(old) = REVNAT.get_ptr(key) {
        // SAFETY: a pointer the map lookup just returned.
        if unsafe { (*old).ip == value.ip && (*old).port == value.port } {
            return;
        }
    }
    let _ = REVNAT.insert(key, value, 0);
}

/// Whether a socket is bound to `ip:port` in the caller's namespace: meshd's, since the
/// map names only ports meshd bound there.
#[inline(always)]
fn listening(sa: *mut bpf_sock_addr, ip: u32, port: u16, stream: bool) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: ip,
                daddr: ip,
                sport: 0,
                dport: port,
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    // SAFETY: a valid context and tuple; a socket found is released before returning.
    unsafe {
        let sk = if stream {
            bpf_sk_lookup_tcp(sa.cast(), &mut tuple, size, CURRENT_NETNS, 0)
        } else {
            bpf_sk_lookup_udp(sa.cast(), &mut tuple, size, CURRENT_NETNS, 0)
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

#[inline(always)]
fn reverse(sa: *mut bpf_sock_addr) {
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    let key = RevNatKey {
        socket_cookie: unsafe { bpf_get_socket_cookie(sa.cast()) },
        ip,
        port,
        _pad: 0,
    };
    if let Some(rev) = REVNAT.get_ptr(&key) {
        unsafe {
            (*sa).user_ip4 = (*rev).ip;
            (*sa).user_port = (*rev).port as u32;
        }
    }
}

#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
