//! Socket-level load balancing for service VIPs.
//!
//! `connect4` and `sendmsg4` rewrite a VIP destination to a backend chosen from the VIP's
//! Maglev table, once per socket: no per-packet NAT, no conntrack entry, nothing to time
//! out. `recvmsg4` and `getpeername4` translate the backend back to the VIP so the
//! application only ever sees the address it asked for. A VIP is looked up together with the
//! caller's network-namespace cookie: only containers attached to the VIP's network see it,
//! and sockets in namespaces meshd does not know pass through untouched.
//!
//! The same hooks send `127.0.0.11:53` to meshd's DNS sockets in the caller's namespace
//! (`DNS`), and show the answers as coming from port 53; only while those sockets exist, so
//! a dead meshd leaves containers to dockerd's resolver instead of to nothing.
#![no_std]
#![no_main]

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
    maps::{HashMap, LruHashMap, PerCpuHashMap},
    programs::SockAddrContext,
};
use meshd_common::{
    capacity, mix64, BackendKey, BackendValue, DnsPorts, LbMeta, LbValue, MaglevKey, RevNatKey,
    RevNatValue, VipKey, VipValue, DNS_ADDR, DNS_PORT,
};

#[map(name = "MESHD_VIPS")]
static VIPS: HashMap<VipKey, VipValue> = HashMap::pinned(capacity::VIPS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_LBS")]
static LBS: HashMap<u32, LbValue> = HashMap::pinned(capacity::LBS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_MAGLEV")]
static MAGLEV: HashMap<MaglevKey, BackendValue> =
    HashMap::pinned(capacity::MAGLEV, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_REVNAT")]
static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(capacity::REVNAT, 0);

#[map(name = "MESHD_BE_CONNS")]
static BACKEND_CONNS: PerCpuHashMap<BackendKey, u64> =
    PerCpuHashMap::pinned(capacity::BACKEND_CONNS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_LB_CONNS")]
static LB_CONNS: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::pinned(capacity::LB_CONNS, BPF_F_NO_PREALLOC);

/// Read only by userspace (it maps ids back to Docker objects after a restart); declared here
/// so it is created and pinned with the others.
#[map(name = "MESHD_LB_META")]
static LB_META: HashMap<u32, LbMeta> = HashMap::pinned(capacity::LBS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_DNS")]
static DNS: HashMap<u64, DnsPorts> = HashMap::pinned(capacity::DNS, BPF_F_NO_PREALLOC);

const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
/// `BPF_F_CURRENT_NETNS`: look the socket up in the caller's namespace.
const CURRENT_NETNS: u64 = u64::MAX;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn meshd_connect4(ctx: SockAddrContext) -> i32 {
    balance(ctx.sock_addr)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn meshd_sendmsg4(ctx: SockAddrContext) -> i32 {
    balance(ctx.sock_addr)
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

#[inline(always)]
fn balance(sa: *mut bpf_sock_addr) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let (vip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    let netns_cookie = unsafe { bpf_get_netns_cookie(sa.cast()) };
    if vip == u32::from_ne_bytes(DNS_ADDR) && port == DNS_PORT.to_be() {
        redirect_dns(sa, netns_cookie, vip, port);
        return ALLOW;
    }
    let key = VipKey {
        netns_cookie,
        ip: vip,
        _pad: 0,
    };
    let Some(entry) = VIPS.get_ptr(&key) else {
        return ALLOW;
    };
    let lb_id = unsafe { (*entry).lb_id };
    let Some(lb) = LBS.get_ptr(&lb_id) else {
        return ALLOW;
    };
    let table_size = unsafe { (*lb).table_size };
    if table_size == 0 {
        // A VIP with no live task: fail the connect at once instead of letting it time out.
        return DENY;
    }
    let socket_cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let slot = (mix64(socket_cookie ^ ((vip as u64) << 32)) % table_size as u64) as u32;
    let Some(backend) = MAGLEV.get_ptr(&MaglevKey { lb_id, slot }) else {
        return ALLOW;
    };
    let backend_ip = unsafe { (*backend).ip };
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

    // Per-CPU counters: a plain increment is race free. Userspace creates the entries.
    if let Some(count) = LB_CONNS.get_ptr_mut(&lb_id) {
        unsafe { *count += 1 };
    }
    let be_key = BackendKey {
        lb_id,
        ip: backend_ip,
    };
    if let Some(count) = BACKEND_CONNS.get_ptr_mut(&be_key) {
        unsafe { *count += 1 };
    }
    ALLOW
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
