// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Clovisor's classifier: one TCX (or clsact) program per hook that reports
 * the payload-carrying and SYN/FIN/RST TCP segments of traced flows to user
 * space through a BPF ring buffer.  On HTTP/1.x flows (with pair_http set)
 * it pairs the exchanges it can frame exactly and reports each as one
 * record; any other connection is handed over to user space, segment by
 * segment (see clovisor.h).
 *
 * Invariants:
 *  - it never changes, drops or redirects a packet and never ends the chain:
 *    every path returns TC_ACT_UNSPEC (TCX "next"), so programs attached
 *    after it (another agent's) still run;
 *  - per-packet work is bounded: a fixed number of header loads, at most six
 *    IPv6 extension headers, at most six hash lookups (two `ports`, then
 *    exact and any-address `egress` rules for each port, only where the
 *    `ports` entry says such rules exist);
 *  - an untraced packet costs the parse and two bit tests (`port_bits`);
 *    a packet of a traced port one or two hash lookups in `ports`, whose
 *    entry also says whether `egress` rules exist for the port; a pure ACK
 *    costs only the parse;
 *  - every record that cannot be written is counted (CLV_CNT_LOST), and an
 *    exchange whose record is lost or shed is still counted in `red`;
 *  - the state a packet can change is its own connection's `conns` entry
 *    (and the counters); every value read from a packet is bounded before
 *    use: head scans by the held bytes, Content-Length by 18 digits and
 *    CLV_BODY_MAX, the status by 100..599.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <stdbool.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "clovisor.h"
#include "http1.h"

/* Dual-licensed (SPDX line above); the kernel is told the GPL option. */
char LICENSE[] SEC("license") = "GPL";

/* Written by the loader before load (frozen .rodata): the verifier sees the
 * values as constants and prunes what they disable. */
const volatile struct clv_settings settings = {
	.capture_bytes = 256,
	.wakeup_bytes = 0,
	.pair_http = 0,
	.shed_bytes = 0,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct clv_port_key);
	__type(value, struct clv_match);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CLV_PORT_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} port_bits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct clv_egress_key);
	__type(value, struct clv_match);
} egress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20); /* the loader sets the real size */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CLV_CNT__MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* HTTP connections (pair_http), clovisor.h */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384); /* the loader sets the real size */
	__type(key, struct clv_conn_key);
	__type(value, struct clv_conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384); /* the loader sets the real size (that of `conns`) */
	__type(key, struct clv_conn_key);
	__type(value, struct clv_syn);
} syns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct clv_scan);
} heads SEC(".maps");

/* RED metrics of the exchanges that did not reach user space; allocated on
 * first use, so that an idle node holds none. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__type(key, struct clv_red_key);
	__type(value, struct clv_red);
} red SEC(".maps");

/* A record is built here, not on the 512-byte stack, and leaves with one
 * bpf_ringbuf_output() of exactly header + captured bytes (+ HTTP/2 frame
 * headers, see clovisor.h) (reserve/commit would need a constant size). */
struct clv_scratch {
	struct clv_segment hdr;
	__u8 data[CLV_CAPTURE_MAX + CLV_H2_FRAMES_MAX * sizeof(struct clv_h2_frame)];
	/* h2_walk's position, kept in memory so that the verifier sees every
	 * iteration of its loop alike and prunes, instead of following each
	 * path through every iteration */
	__s64 h2_off;
	__u64 h2_count;
};

/* HTTP/2 and gRPC flows: each direction's next frame header (clovisor.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct clv_h2_key);
	__type(value, struct clv_h2_state);
} h2_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct clv_scratch);
} scratch SEC(".maps");

/* The parsed facts of one TCP segment. */
struct clv_pkt {
	__u64 l3head;      /* first 8 bytes of the network header */
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 seq;         /* network byte order */
	__u32 ack;         /* network byte order */
	__u32 payload_off; /* from the network header */
	__u32 payload_len;
	__u16 sport;       /* host byte order */
	__u16 dport;
	__u8 family;
	__u8 flags;
	__u8 pad[2];
};

enum clv_parse {
	CLV_PARSE_TCP = 0,
	CLV_PARSE_SKIP = 1, /* not TCP, or a non-first fragment: not ours */
	CLV_PARSE_BAD = 2,  /* truncated or inconsistent headers */
};

/* a bounded loop (kernel >= 5.3), not unrolled: clang cannot unroll it */
#define CLV_IPV6_EXT_MAX 6
#define CLV_TCP_FLAG_MASK (CLV_TCP_FIN | CLV_TCP_SYN | CLV_TCP_RST | CLV_TCP_PSH | CLV_TCP_ACK)
#define CLV_TCP_REPORT (CLV_TCP_FIN | CLV_TCP_SYN | CLV_TCP_RST)

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);

	if (v)
		*v += 1;
}

/* Headers: relative to the network header, which works with or without an
 * L2 header (veth, lo, tun).  It reads the linear part only, where the
 * stack keeps the headers. */
static __always_inline int load_net(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	return bpf_skb_load_bytes_relative(skb, off, to, len, BPF_HDR_START_NET);
}

/*
 * Payload is another matter: TCP puts it in page fragments, which only
 * bpf_skb_load_bytes() reads, with offsets from skb->data.  __sk_buff does
 * not say where the network header is from there, so look for it: the
 * network header's first 8 bytes right after an Ethernet header (veth,
 * NICs, lo), else at skb->data itself (L3 devices: tun, wireguard).  -1:
 * not found, payload then comes from the linear part only.
 */
static __always_inline int find_net_off(struct __sk_buff *skb, __u64 l3head)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (data + ETH_HLEN + 8 <= end && *(__u64 *)(data + ETH_HLEN) == l3head)
		return ETH_HLEN;
	if (data + 8 <= end && *(__u64 *)data == l3head)
		return 0;
	return -1;
}

static __always_inline int load_l3(struct __sk_buff *skb, int net_off, __u32 off, void *to,
				   __u32 len)
{
	if (net_off >= 0)
		return bpf_skb_load_bytes(skb, net_off + off, to, len);
	return load_net(skb, off, to, len);
}

/* The L3 length when the IP length field is 0: a BIG TCP GSO/GRO packet
 * (> 64 KiB); 0 (malformed) if the network header cannot be found. */
static __always_inline __u32 big_l3_len(struct __sk_buff *skb, __u64 l3head)
{
	int net_off = find_net_off(skb, l3head);

	return net_off < 0 ? 0 : skb->len - net_off;
}

static __always_inline int parse_tcp(struct __sk_buff *skb, struct clv_pkt *p, __u32 l4off,
				     __u32 l3len)
{
	struct tcphdr th;
	__u32 hlen;

	if (load_net(skb, l4off, &th, sizeof(th)))
		return CLV_PARSE_BAD;
	hlen = th.doff * 4;
	if (hlen < sizeof(th) || l3len < l4off + hlen)
		return CLV_PARSE_BAD;
	p->sport = bpf_ntohs(th.source);
	p->dport = bpf_ntohs(th.dest);
	p->seq = th.seq;
	p->ack = th.ack_seq;
	/* byte 13 of the TCP header holds the flags in CLV_TCP_* bit order */
	p->flags = ((__u8 *)&th)[13] & CLV_TCP_FLAG_MASK;
	p->payload_off = l4off + hlen;
	/* from the IP length, never skb->len: Ethernet padding is not payload */
	p->payload_len = l3len - l4off - hlen;
	return CLV_PARSE_TCP;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct clv_pkt *p)
{
	struct iphdr ih;
	__u32 hlen, l3len;

	if (load_net(skb, 0, &ih, sizeof(ih)))
		return CLV_PARSE_BAD;
	hlen = ih.ihl * 4;
	if (ih.version != 4 || hlen < sizeof(ih))
		return CLV_PARSE_BAD;
	if (ih.protocol != IPPROTO_TCP)
		return CLV_PARSE_SKIP;
	/* a non-first fragment carries no TCP header */
	if (ih.frag_off & bpf_htons(0x1fff))
		return CLV_PARSE_SKIP;
	__builtin_memcpy(&p->l3head, &ih, sizeof(p->l3head));
	l3len = bpf_ntohs(ih.tot_len);
	if (l3len == 0 && skb->gso_segs > 1)
		l3len = big_l3_len(skb, p->l3head);
	p->family = 4;
	p->saddr[0] = ih.saddr;
	p->daddr[0] = ih.daddr;
	p->saddr[1] = p->saddr[2] = p->saddr[3] = 0;
	p->daddr[1] = p->daddr[2] = p->daddr[3] = 0;
	return parse_tcp(skb, p, hlen, l3len);
}

struct clv_ipv6_ext {
	__u8 nexthdr;
	__u8 hdrlen;
	__be16 frag_off; /* fragment header only */
};

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct clv_pkt *p)
{
	struct ipv6hdr ih;
	struct clv_ipv6_ext ext;
	__u32 off = sizeof(ih), l3len;
	__u8 next;

	if (load_net(skb, 0, &ih, sizeof(ih)))
		return CLV_PARSE_BAD;
	if (ih.version != 6)
		return CLV_PARSE_BAD;
	next = ih.nexthdr;
	for (int i = 0; i < CLV_IPV6_EXT_MAX; i++) {
		if (next == IPPROTO_TCP)
			break;
		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS &&
		    next != IPPROTO_FRAGMENT && next != IPPROTO_AH)
			return CLV_PARSE_SKIP;
		if (load_net(skb, off, &ext, sizeof(ext)))
			return CLV_PARSE_BAD;
		if (next == IPPROTO_FRAGMENT) {
			if (ext.frag_off & bpf_htons(0xfff8))
				return CLV_PARSE_SKIP;
			off += 8;
		} else if (next == IPPROTO_AH) {
			off += (ext.hdrlen + 2) * 4;
		} else {
			off += (ext.hdrlen + 1) * 8;
		}
		next = ext.nexthdr;
	}
	if (next != IPPROTO_TCP)
		return CLV_PARSE_SKIP; /* more extension headers than we walk */
	__builtin_memcpy(&p->l3head, &ih, sizeof(p->l3head));
	l3len = bpf_ntohs(ih.payload_len);
	l3len = l3len ? l3len + sizeof(ih) : big_l3_len(skb, p->l3head);
	p->family = 6;
	__builtin_memcpy(p->saddr, &ih.saddr, 16);
	__builtin_memcpy(p->daddr, &ih.daddr, 16);
	return parse_tcp(skb, p, off, l3len);
}

static __always_inline int parse(struct __sk_buff *skb, struct clv_pkt *p)
{
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, p);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(skb, p);
	return CLV_PARSE_SKIP;
}

/* An egress rule for the remote end {port, addr}: exact address first, then
 * the any-address rule; `bits` (from the ports entry) says which exist. */
static __always_inline struct clv_match *match_egress(__u32 ifindex, __u16 port, __u8 family,
						      __u32 *addr, __u8 bits)
{
	struct clv_egress_key k = { .ifindex = ifindex, .port = port };
	struct clv_match *m;
	__u8 exact = family == 4 ? CLV_EGRESS_V4 : CLV_EGRESS_V6;

	if (bits & exact) {
		k.family = family;
		__builtin_memcpy(k.addr, addr, 16);
		m = bpf_map_lookup_elem(&egress, &k);
		if (m)
			return m;
		k.family = 0;
		__builtin_memset(k.addr, 0, 16);
	}
	if (bits & CLV_EGRESS_ANY)
		return bpf_map_lookup_elem(&egress, &k);
	return NULL;
}

/* May some interface trace this port?  (No false negatives.) */
static __always_inline bool port_listed(__u16 port)
{
	__u32 idx = port >> 6;
	__u64 *word = bpf_map_lookup_elem(&port_bits, &idx);

	return word && (*word >> (port & 63)) & 1;
}

static __always_inline struct clv_match *port_entry(__u32 ifindex, __u16 port)
{
	struct clv_port_key k = { .ifindex = ifindex, .port = port };

	return port_listed(port) ? bpf_map_lookup_elem(&ports, &k) : NULL;
}

/* Decide dir/role/proto; false when the segment is not traced here. */
static __always_inline bool match(__u32 ifindex, struct clv_pkt *p, struct clv_segment *h)
{
	struct clv_match *dm, *sm, *m;

	dm = port_entry(ifindex, p->dport);
	if (dm && dm->proto) {
		h->dir = CLV_DIR_REQUEST;
		h->role = CLV_ROLE_SERVER;
		h->proto = dm->proto;
		return true;
	}
	sm = port_entry(ifindex, p->sport);
	if (sm && sm->proto) {
		h->dir = CLV_DIR_RESPONSE;
		h->role = CLV_ROLE_SERVER;
		h->proto = sm->proto;
		return true;
	}
	if (dm && dm->egress) {
		m = match_egress(ifindex, p->dport, p->family, p->daddr, dm->egress);
		if (m) {
			h->dir = CLV_DIR_REQUEST;
			h->role = CLV_ROLE_CLIENT;
			h->proto = m->proto;
			return true;
		}
	}
	if (sm && sm->egress) {
		m = match_egress(ifindex, p->sport, p->family, p->saddr, sm->egress);
		if (m) {
			h->dir = CLV_DIR_RESPONSE;
			h->role = CLV_ROLE_CLIENT;
			h->proto = m->proto;
			return true;
		}
	}
	return false;
}

/* Copy the payload prefix into s->data and the last bytes into the tail;
 * returns the prefix length, or -1 when the skb is shorter than its IP
 * length says (a hostile or truncated packet). */
static __always_inline int capture(struct __sk_buff *skb, struct clv_pkt *p,
				   struct clv_scratch *s)
{
	/* 64-bit on purpose: without alu32, a __u32 lives in a register whose
	 * upper half clang leaves undefined, and the verifier bounds the whole
	 * register */
	__u64 cap = settings.capture_bytes;
	__u64 n = p->payload_len, t;
	int net_off = find_net_off(skb, p->l3head);

	if (cap > CLV_CAPTURE_MAX)
		cap = CLV_CAPTURE_MAX;
	if (n > cap)
		n = cap;
	s->hdr.tail_len = 0;
	/* clang knows n <= cap and would drop a plain re-check; barrier_var
	 * makes it re-test n in the register the verifier will look at */
	barrier_var(n);
	if (n > CLV_CAPTURE_MAX)
		return -1;
	if (n > 0 && load_l3(skb, net_off, p->payload_off, s->data, n))
		return -1;
	if (p->payload_len > n) {
		t = p->payload_len - n;
		if (t > CLV_TAIL_LEN)
			t = CLV_TAIL_LEN;
		barrier_var(t);
		if (t == 0 || t > CLV_TAIL_LEN)
			return -1;
		if (load_l3(skb, net_off, p->payload_off + p->payload_len - t, s->hdr.tail, t))
			return -1;
		s->hdr.tail_len = t;
	}
	return n;
}

/* --- HTTP/2 frame headers beyond the capture (ports declared http2/grpc) --- */

/* The length field of a frame header that began with the `have` (1-8) last
 * bytes of the previous segment (st->part) and goes on in this one. */
static __always_inline int h2_split_length(struct __sk_buff *skb, int net_off, __u32 payload_off,
					   __s64 len, struct clv_h2_state *st, __u32 *flen)
{
	__u64 a = 0, b = 0;
	__u32 have = st->have;

	if (have < 1 || have > 8 || len < 9 - have || len < 8)
		return -1;
	__builtin_memcpy(&a, st->part, 8);
	if (load_l3(skb, net_off, payload_off, &b, 8))
		return -1;
	a = bpf_be64_to_cpu(a);
	b = bpf_be64_to_cpu(b);
	if (have >= 3)
		*flen = (a >> (8 * (have - 3))) & 0xffffff;
	else
		*flen = ((a << (8 * (3 - have))) | (b >> (8 * (5 + have)))) & 0xffffff;
	return 0;
}

/*
 * Append the clv_h2_frame of the frame header at `off` (not whole in the n
 * captured bytes) to the record in the scratch buffer; returns its payload
 * length, or -1 when it cannot (the record is full, a load failed).  A
 * global function, like h2_walk: the walk's loop body stays small for the
 * verifier, which checks this once.
 */
__attribute__((noinline)) __s64 h2_report(struct __sk_buff *skb, int net_off, __u32 payload_off,
					  __u32 n, __s64 off)
{
	struct clv_scratch *s;
	struct clv_h2_frame *f;
	__u32 zero = 0, flen;
	/* 64-bit on purpose, as in capture() */
	__u64 at, cp, count;
	__s64 len;
	__u8 head[9];

	s = bpf_map_lookup_elem(&scratch, &zero);
	if (!s)
		return -1;
	len = s->hdr.payload_len;
	if (n > CLV_CAPTURE_MAX || off < 0 || off + 9 > len)
		return -1;
	if (load_l3(skb, net_off, payload_off + off, head, 9))
		return -1;
	flen = ((__u32)head[0] << 16) | ((__u32)head[1] << 8) | head[2];
	count = s->h2_count;
	if (count >= CLV_H2_FRAMES_MAX)
		return -1;
	at = n + count * sizeof(*f);
	barrier_var(at);
	if (at > CLV_CAPTURE_MAX + (CLV_H2_FRAMES_MAX - 1) * sizeof(*f))
		return -1;
	f = (void *)(s->data + at);
	f->offset = off;
	__builtin_memcpy(f->head, head, 9);
	f->pad[0] = f->pad[1] = 0;
	cp = 0;
	if (head[3] != 0) { /* not DATA: its first bytes may be needed */
		cp = len - off - 9;
		if (cp > flen)
			cp = flen;
		if (cp > CLV_H2_PEEK)
			cp = CLV_H2_PEEK;
		barrier_var(cp);
		if (cp > CLV_H2_PEEK ||
		    (cp && load_l3(skb, net_off, payload_off + off + 9, f->peek, cp)))
			cp = 0;
	}
	f->peek_len = cp;
	s->h2_count = count + 1;
	return flen;
}

/*
 * Walk the frame headers of the segment whose record header is in the
 * scratch buffer, n bytes of it captured: append a clv_h2_frame at data + n
 * for each one not whole in the capture, and move the flow's state on.
 * Returns how many were appended.  When the state cannot follow (a gap,
 * more headers than CLV_H2_FRAMES_MAX, a header over three segments) it is
 * dropped, and user space loses framing as it would without the walk.
 *
 * A global function: the verifier checks it once, whatever the caller's
 * path, with its arguments unknown (an inlined loop was checked per path
 * and went past the verifier's budget).
 */
__attribute__((noinline)) int h2_walk(struct __sk_buff *skb, __u32 n, __u32 payload_off,
				      int net_off)
{
	struct clv_h2_key k = {};
	struct clv_h2_state *st, init = {};
	struct clv_scratch *s;
	struct clv_segment *h;
	__u32 zero = 0, seq, flen;
	__u64 at, count;
	__s64 off, len, rc;
	int i;

	s = bpf_map_lookup_elem(&scratch, &zero);
	if (!s || n > CLV_CAPTURE_MAX)
		return 0;
	h = &s->hdr;
	seq = h->seq;
	len = h->payload_len;
	k.ifindex = h->ifindex;
	k.sport = h->sport;
	k.dport = h->dport;
	__builtin_memcpy(k.saddr, h->saddr, 16);
	__builtin_memcpy(k.daddr, h->daddr, 16);
	if (h->tcp_flags & CLV_TCP_SYN) {
		/* the client's first bytes are the 24-byte preface, not a frame */
		init.next_seq = seq + 1 + (h->dir == CLV_DIR_REQUEST ? 24 : 0);
		bpf_map_update_elem(&h2_flows, &k, &init, BPF_ANY);
		return 0;
	}
	if (h->tcp_flags & CLV_TCP_RST) {
		bpf_map_delete_elem(&h2_flows, &k);
		return 0;
	}
	st = bpf_map_lookup_elem(&h2_flows, &k);
	if (!st || len == 0)
		return 0;
	off = (__s32)(st->next_seq - seq);
	if (st->have) {
		if (off != -(__s64)st->have ||
		    h2_split_length(skb, net_off, payload_off, len, st, &flen))
			goto lost;
		off += 9 + flen;
		st->have = 0;
	}
	if (off < 0)
		goto lost; /* the segment starts past the header we expect: a gap */
	s->h2_off = off;
	s->h2_count = 0;
	/* unrolled: each copy is its own instruction for the verifier, whose
	 * work is then linear in the bound (a loop kept the states of every
	 * iteration at its head, and compared each new one with all of them) */
#pragma clang loop unroll(full)
	for (i = 0; i < CLV_H2_FRAMES_MAX; i++) {
		off = *(volatile __s64 *)&s->h2_off;
		if (off < 0 || off >= len)
			break;
		if (off + 9 > len) {
			/* split across segments: keep this one's last 8 bytes */
			if (len < 8 || load_l3(skb, net_off, payload_off + len - 8, st->part, 8))
				goto lost;
			st->have = len - off;
			break;
		}
		if (off + 9 <= n) {
			/* captured: its length from the copy, and user space has it */
			at = off;
			barrier_var(at);
			if (at > CLV_CAPTURE_MAX - 9)
				goto lost;
			flen = ((__u32)s->data[at] << 16) | ((__u32)s->data[at + 1] << 8) |
			       s->data[at + 2];
			s->h2_off = off + 9 + flen;
			continue;
		}
		rc = h2_report(skb, net_off, payload_off, n, off);
		if (rc < 0)
			goto lost;
		s->h2_off = off + 9 + rc;
	}
	off = s->h2_off;
	if (i == CLV_H2_FRAMES_MAX && off < len && !st->have)
		goto lost; /* more headers than one segment may report */
	st->next_seq = seq + off;
	count = s->h2_count;
	return count > CLV_H2_FRAMES_MAX ? 0 : count;
lost:
	bpf_map_delete_elem(&h2_flows, &k);
	count = s->h2_count;
	return count > CLV_H2_FRAMES_MAX ? 0 : count;
}

static __always_inline void fill_header(struct __sk_buff *skb, struct clv_pkt *p,
					struct clv_segment *h, __u8 hook)
{
	__u32 segs = skb->gso_segs;

	h->type = CLV_EV_SEGMENT;
	h->family = p->family;
	h->tcp_flags = p->flags;
	h->hook = hook;
	h->ts_ns = bpf_ktime_get_ns();
	h->ifindex = skb->ifindex;
	h->seq = bpf_ntohl(p->seq);
	h->ack = bpf_ntohl(p->ack);
	h->payload_len = p->payload_len;
	__builtin_memcpy(h->saddr, p->saddr, 16);
	__builtin_memcpy(h->daddr, p->daddr, 16);
	h->sport = p->sport;
	h->dport = p->dport;
	h->gso_segs = segs ? (segs > 0xffff ? 0xffff : segs) : 1;
}

/* The ringbuf_output flags for a record of `size` bytes. */
static __always_inline __u64 wake_flags(__u64 size)
{
	__u64 avail, wake = settings.wakeup_bytes;

	/*
	 * Batch wake-ups: wake the reader only when this record makes the
	 * unread data cross wakeup_bytes.  Above the threshold the reader is
	 * already woken (a level-triggered epoll does not lose it), and waking
	 * again per record would cost an irq_work each; below it, the reader's
	 * poll timeout bounds the latency.  wakeup_bytes 0: wake every record;
	 * CLV_WAKEUP_NEVER: never, the reader drains on a timer, and the ring
	 * is not even queried (measured: about 60 ns less per packet).
	 */
	if (wake == CLV_WAKEUP_NEVER)
		return BPF_RB_NO_WAKEUP;
	if (wake == 0)
		return BPF_RB_FORCE_WAKEUP;
	avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	if (avail < wake && avail + size >= wake)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

/* One record to the ring, counted either way; false if it was lost. */
static __always_inline bool output(void *data, __u64 size)
{
	if (bpf_ringbuf_output(&events, data, size, wake_flags(size))) {
		count(CLV_CNT_LOST);
		return false;
	}
	count(CLV_CNT_EVENTS);
	return true;
}

/* A call, not inlined: the paired path reaches it only on its cold branches,
 * and a compact hot path is what costs least with cold caches. */
static __noinline void emit(struct __sk_buff *skb, struct clv_pkt *p, struct clv_scratch *s,
			    __u8 hook)
{
	__u64 size, frames;
	int n;

	n = capture(skb, p, s);
	if (n < 0) {
		count(CLV_CNT_MALFORMED);
		return;
	}
	fill_header(skb, p, &s->hdr, hook);
	s->hdr.cap_len = n;
	size = sizeof(s->hdr) + n;
	if (s->hdr.proto == CLV_PROTO_HTTP2 || s->hdr.proto == CLV_PROTO_GRPC) {
		frames = h2_walk(skb, n, p->payload_off, find_net_off(skb, p->l3head));
		barrier_var(frames);
		if (frames <= CLV_H2_FRAMES_MAX)
			size += frames * sizeof(struct clv_h2_frame);
	}
	output(s, size);
}

/* --- HTTP/1.x pairing ------------------------------------------------------------ */

static __always_inline __u16 gso_of(struct __sk_buff *skb)
{
	__u32 segs = skb->gso_segs;

	return segs ? (segs > 0xffff ? 0xffff : segs) : 1;
}

/* Held head bytes: verifier-known constants (settings is frozen .rodata). */
static __always_inline __u64 held_req(void)
{
	__u64 cap = settings.capture_bytes;

	return cap < CLV_REQ_HEAD_MAX ? cap : CLV_REQ_HEAD_MAX;
}

static __always_inline __u64 held_resp(void)
{
	__u64 cap = settings.capture_bytes;

	return cap < CLV_RESP_HEAD_MAX ? cap : CLV_RESP_HEAD_MAX;
}

/* What a segment does to a paired connection, when it is not a handover
 * (an enum clv_handover_reason, > 0). */
#define CLV_TAKEN 0    /* the segment is accounted in the held exchange */
#define CLV_IGNORED -1 /* a duplicate of bytes already accounted */

static __always_inline void conn_key(__u32 ifindex, struct clv_pkt *p, __u8 dir, __u8 role,
				     struct clv_conn_key *k)
{
	k->ifindex = ifindex;
	k->role = role;
	k->family = p->family;
	k->pad = 0;
	if (dir == CLV_DIR_REQUEST) {
		k->cport = p->sport;
		k->sport = p->dport;
		__builtin_memcpy(k->caddr, p->saddr, 16);
		__builtin_memcpy(k->saddr, p->daddr, 16);
	} else {
		k->cport = p->dport;
		k->sport = p->sport;
		__builtin_memcpy(k->caddr, p->daddr, 16);
		__builtin_memcpy(k->saddr, p->saddr, 16);
	}
}

/* Is this entry the key's (not an element reused for another connection)? */
static __always_inline bool same_key(struct clv_exchange *ex, struct clv_conn_key *k)
{
	/* 4-byte words: the key's addresses are 4-aligned on the stack */
	__u32 *x = (__u32 *)ex->caddr, *y = (__u32 *)k->caddr;
	__u32 diff = 0;

	for (int i = 0; i < 8; i++)
		diff |= x[i] ^ y[i];
	return !diff && ex->ifindex == k->ifindex && ex->role == k->role &&
	       ex->family == k->family && ex->cport == k->cport && ex->sport == k->sport;
}

/*
 * The two directions of a connection pass different hooks, possibly on two
 * CPUs at once: a try-lock on the entry keeps its state machine whole.  The
 * holder never waits for anything, so a short bounded spin almost always
 * wins; the lock word's bit 1 tells the holder that a CPU gave up.
 */
#define CLV_LOCK_TAKEN 1ULL
#define CLV_LOCK_MISSED 2ULL
#define CLV_LOCK_SPINS 128

static __always_inline bool conn_lock(struct clv_conn *c)
{
	__u64 old;

	for (int i = 0; i < CLV_LOCK_SPINS; i++) {
		if (*(volatile __u64 *)&c->lock == 0 &&
		    __sync_val_compare_and_swap(&c->lock, 0, CLV_LOCK_TAKEN) == 0)
			return true;
	}
	/* Give up, and say so to the holder: only while it still holds the
	 * lock (marking a free lock would keep everyone out). */
	for (int i = 0; i < 4; i++) {
		old = *(volatile __u64 *)&c->lock;
		if (old == 0) {
			if (__sync_val_compare_and_swap(&c->lock, 0, CLV_LOCK_TAKEN) == 0)
				return true;
		} else if (__sync_val_compare_and_swap(&c->lock, old, old | CLV_LOCK_MISSED) ==
			   old) {
			return false;
		}
	}
	return false;
}

/* true if a CPU gave up on the lock meanwhile: the caller hands over. */
static __always_inline bool conn_unlock(struct clv_conn *c)
{
	return __sync_lock_test_and_set(&c->lock, 0) & CLV_LOCK_MISSED;
}

/* A new entry, built in the scratch buffer (larger than any value). */
static __noinline struct clv_conn *conn_new(struct clv_conn_key *key, struct clv_scratch *s,
					    __u8 mode, __u32 req_next)
{
	struct clv_conn *t = (struct clv_conn *)s;

	if (!t)
		return NULL;
	/* the held bytes are always written before they are read */
	__builtin_memset(t, 0, __builtin_offsetof(struct clv_conn, data));
	t->mode = mode;
	t->req_next = req_next;
	t->ex.type = CLV_EV_EXCHANGE;
	t->ex.role = key->role;
	t->ex.family = key->family;
	t->ex.cport = key->cport;
	t->ex.sport = key->sport;
	t->ex.ifindex = key->ifindex;
	__builtin_memcpy(t->ex.caddr, key->caddr, 16);
	__builtin_memcpy(t->ex.saddr, key->saddr, 16);
	/* BPF_ANY: a stale entry of the same key (a port reused) is replaced */
	if (bpf_map_update_elem(&conns, key, t, BPF_ANY))
		return NULL;
	return bpf_map_lookup_elem(&conns, key);
}

static __always_inline void hold_seg(struct clv_held_seg *h, __u64 now, __u32 seq, __u32 ack,
				     __u32 len, __u16 gso, __u8 flags, __u8 hook)
{
	h->ts_ns = now;
	h->seq = seq;
	h->ack = ack;
	h->payload_len = len;
	h->gso_segs = gso;
	h->tcp_flags = flags;
	h->hook = hook;
}

/* A clv_segment header for a held segment of the connection. */
static __always_inline void held_header(struct clv_segment *h, struct clv_conn_key *k, __u8 dir,
					__u64 ts, __u32 seq, __u32 ack, __u32 len, __u16 gso,
					__u8 flags, __u8 hook, __u16 cap)
{
	h->type = CLV_EV_SEGMENT;
	h->dir = dir;
	h->role = k->role;
	h->proto = CLV_PROTO_HTTP;
	h->family = k->family;
	h->tcp_flags = flags;
	h->hook = hook;
	h->tail_len = 0;
	h->ts_ns = ts;
	h->ifindex = k->ifindex;
	h->seq = seq;
	h->ack = ack;
	h->payload_len = len;
	if (dir == CLV_DIR_REQUEST) {
		__builtin_memcpy(h->saddr, k->caddr, 16);
		__builtin_memcpy(h->daddr, k->saddr, 16);
		h->sport = k->cport;
		h->dport = k->sport;
	} else {
		__builtin_memcpy(h->saddr, k->saddr, 16);
		__builtin_memcpy(h->daddr, k->caddr, 16);
		h->sport = k->sport;
		h->dport = k->cport;
	}
	h->cap_len = cap;
	h->gso_segs = gso;
}

/* Body bytes counted after a head segment: one record with no payload
 * bytes (user space counts by sequence number). */
static __always_inline void held_body(struct clv_scratch *s, struct clv_conn_key *k, __u8 dir,
				      struct clv_held_seg *head, __u64 bytes, __u32 packets,
				      __u64 ts, __u32 ack)
{
	if (bytes <= head->payload_len)
		return;
	held_header(&s->hdr, k, dir, ts, head->seq + head->payload_len, ack,
		    bytes - head->payload_len, packets - head->gso_segs, CLV_TCP_ACK, head->hook, 0);
	output(&s->hdr, sizeof(s->hdr));
}

/*
 * Stop pairing: a clv_handover record with the boundaries, then what is
 * held, as the segments user space would have seen.  The head segments
 * leave from the entry itself: a clv_segment header written just before
 * the held bytes (over the exchange header, or over request bytes already
 * sent), so that header and bytes go out with one bpf_ringbuf_output.
 * The caller emits the current segment next and sets the mode.
 */
static __noinline void handover(struct clv_conn *c, struct clv_scratch *s, struct clv_conn_key *k,
				__u8 reason, __u64 now)
{
	__u64 rl, sl, req_bytes, resp_bytes;
	__u32 req_at, resp_at = 0, req_packets, resp_packets;
	__u8 phase, synced = CLV_SYNC_REQUEST;
	struct clv_segment *seg;
	struct clv_handover *h;

	if (!c || !s || reason >= CLV_HO__MAX)
		return;
	phase = c->phase;
	req_at = phase == CLV_PHASE_IDLE ? c->req_next : c->ex.req_seq;
	/* read before the first header is written over the exchange header */
	rl = c->ex.req_head_len;
	sl = c->ex.resp_head_len;
	req_bytes = c->ex.req_bytes;
	resp_bytes = c->ex.resp_bytes;
	req_packets = c->ex.req_packets;
	resp_packets = c->ex.resp_packets;
	count(CLV_CNT_HANDOVERS);
	count(CLV_CNT_HANDOVERS + reason);
	if (phase == CLV_PHASE_IDLE && (c->flags & CLV_CONN_AT_START))
		synced |= CLV_SYNC_START;
	if (c->flags & CLV_CONN_RESP_KNOWN) {
		synced |= CLV_SYNC_RESPONSE;
		resp_at = phase == CLV_PHASE_RESPONSE ? c->resp_seg.seq : c->resp_next;
	}
	h = bpf_ringbuf_reserve(&events, sizeof(*h), 0);
	if (h) {
		h->type = CLV_EV_HANDOVER;
		h->role = k->role;
		h->family = k->family;
		h->reason = reason;
		h->synced = synced;
		h->pad = 0;
		h->cport = k->cport;
		h->sport = k->sport;
		h->pad2 = 0;
		h->ifindex = k->ifindex;
		h->req_seq = req_at;
		h->resp_seq = resp_at;
		h->ts_ns = now;
		__builtin_memcpy(h->caddr, k->caddr, 16);
		__builtin_memcpy(h->saddr, k->saddr, 16);
		bpf_ringbuf_submit(h, wake_flags(sizeof(*h)));
		count(CLV_CNT_EVENTS);
	} else {
		count(CLV_CNT_LOST);
	}
	if (phase == CLV_PHASE_IDLE)
		return;
	if (rl > held_req() || sl > held_resp())
		return; /* cannot be: the entry is corrupt; user space resyncs */
	seg = (struct clv_segment *)(c->data - sizeof(*seg));
	held_header(seg, k, CLV_DIR_REQUEST, c->req_seg.ts_ns, c->req_seg.seq, c->req_seg.ack,
		    c->req_seg.payload_len, c->req_seg.gso_segs, c->req_seg.tcp_flags,
		    c->req_seg.hook, rl);
	output(seg, sizeof(*seg) + rl);
	held_body(s, k, CLV_DIR_REQUEST, &c->req_seg, req_bytes, req_packets, c->req_body_ts,
		  c->req_body_ack);
	if (phase != CLV_PHASE_RESPONSE)
		return;
	seg = (struct clv_segment *)(c->data + rl - sizeof(*seg));
	held_header(seg, k, CLV_DIR_RESPONSE, c->resp_seg.ts_ns, c->resp_seg.seq, c->resp_seg.ack,
		    c->resp_seg.payload_len, c->resp_seg.gso_segs, c->resp_seg.tcp_flags,
		    c->resp_seg.hook, sl);
	output(seg, sizeof(*seg) + sl);
	held_body(s, k, CLV_DIR_RESPONSE, &c->resp_seg, resp_bytes, resp_packets,
		  c->resp_body_ts, c->resp_body_ack);
}

/* OpenTelemetry's HTTP duration buckets, in ns: the index of the first
 * bound >= d (CLV_RED_BUCKETS - 1: +Inf). */
static __always_inline __u32 red_bucket(__u64 d)
{
	if (d <= 100000000ULL) {
		if (d <= 5000000ULL)
			return 0;
		if (d <= 10000000ULL)
			return 1;
		if (d <= 25000000ULL)
			return 2;
		if (d <= 50000000ULL)
			return 3;
		if (d <= 75000000ULL)
			return 4;
		return 5;
	}
	if (d <= 250000000ULL)
		return 6;
	if (d <= 500000000ULL)
		return 7;
	if (d <= 750000000ULL)
		return 8;
	if (d <= 1000000000ULL)
		return 9;
	if (d <= 2500000000ULL)
		return 10;
	if (d <= 5000000000ULL)
		return 11;
	if (d <= 7500000000ULL)
		return 12;
	if (d <= 10000000000ULL)
		return 13;
	return 14;
}

/* An exchange user space will not see: counted in `red`. */
static __noinline void red_count(struct clv_exchange *ex)
{
	struct clv_red_key k = {
		.ifindex = ex->ifindex,
		.port = ex->sport,
		.role = ex->role,
		.method = ex->method,
		.status = ex->status,
	};
	__u64 d = ex->end_ns > ex->start_ns ? ex->end_ns - ex->start_ns : 0;
	struct clv_red *r = bpf_map_lookup_elem(&red, &k);
	__u32 b = red_bucket(d);

	if (!r) {
		struct clv_red zero = {};

		bpf_map_update_elem(&red, &k, &zero, BPF_NOEXIST);
		r = bpf_map_lookup_elem(&red, &k);
		if (!r)
			return;
	}
	r->count += 1;
	r->sum_ns += d;
	if (b < CLV_RED_BUCKETS)
		r->buckets[b] += 1;
}

/* The response ended: one record for the exchange (or, past capacity, a
 * count in `red`). */
static __always_inline void finish(struct clv_conn *c)
{
	__u64 rl = c->ex.req_head_len, sl = c->ex.resp_head_len, size, shed = settings.shed_bytes;

	c->phase = CLV_PHASE_IDLE;
	c->ex.phase = 0;
	if (rl > held_req() || sl > held_resp())
		return;
	size = sizeof(c->ex) + rl + sl;
	if (shed && bpf_ringbuf_query(&events, BPF_RB_RING_SIZE) -
				bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) <
			    shed + size) {
		count(CLV_CNT_SHED);
		red_count(&c->ex);
		return;
	}
	if (output(&c->ex, size))
		count(CLV_CNT_EXCHANGES);
	else
		red_count(&c->ex);
}

/* A request segment of a paired connection. */
static __always_inline int on_request(struct __sk_buff *skb, struct clv_pkt *p,
				      struct clv_conn *c, __u64 now, __u8 hook)
{
	__u32 seq = bpf_ntohl(p->seq), ack = bpf_ntohl(p->ack), len = p->payload_len;
	__u32 behind = c->req_next - seq, zero = 0;
	__u64 held = held_req(), n, hl;
	__s32 d = seq - c->req_next;
	__u16 gso = gso_of(skb);
	struct clv_scan *sc;
	__s64 cl, extra;
	int net_off;

	if (c->phase == CLV_PHASE_REQUEST) {
		/* body bytes, counted by sequence number */
		if (d < 0) {
			if (behind >= len)
				return CLV_IGNORED;
			len -= behind; /* a retransmission that brings new bytes too */
		} else if (d > 0) {
			return CLV_HO_ORDER;
		}
		if (len > c->req_left)
			return CLV_HO_PIPELINE;
		c->req_left -= len;
		c->req_next += len;
		c->ex.req_bytes += len;
		c->ex.req_packets += gso;
		c->req_body_ts = now;
		c->req_body_ack = ack;
		if (!c->req_left) {
			c->phase = CLV_PHASE_WAIT;
			c->ex.phase = CLV_PHASE_WAIT;
		}
		return CLV_TAKEN;
	}
	if (d < 0 && behind >= len)
		return CLV_IGNORED;
	if (c->phase != CLV_PHASE_IDLE)
		return CLV_HO_PIPELINE; /* a request while an exchange is pending */
	if (d != 0)
		return CLV_HO_ORDER;
	/* a request head starts here, and must end within the held bytes */
	n = len < held ? len : held;
	barrier_var(n);
	if (n < 18 || n > CLV_REQ_HEAD_MAX)
		return CLV_HO_REQUEST;
	sc = bpf_map_lookup_elem(&heads, &zero);
	if (!sc)
		return CLV_HO_REQUEST;
	net_off = find_net_off(skb, p->l3head);
	if (load_l3(skb, net_off, p->payload_off, c->data, n))
		return CLV_HO_REQUEST;
	if (clv_parse_request(c, sc, n, held))
		return CLV_HO_REQUEST;
	hl = sc->len;
	cl = sc->body < 0 ? 0 : sc->body;
	extra = (__s64)len - (__s64)hl;
	if (extra > cl)
		return CLV_HO_PIPELINE; /* bytes beyond the request */
	hold_seg(&c->req_seg, now, seq, ack, len, gso, p->flags, hook);
	c->req_next = seq + len;
	c->req_left = cl - extra;
	c->req_body_ts = now;
	c->req_body_ack = ack;
	c->phase = c->req_left ? CLV_PHASE_REQUEST : CLV_PHASE_WAIT;
	c->ex.phase = c->phase;
	c->ex.method = sc->method;
	c->ex.status = 0;
	c->ex.req_head_len = hl;
	c->ex.resp_head_len = 0;
	c->ex.req_seq = seq;
	c->ex.req_ack = ack;
	c->ex.req_packets = gso;
	c->ex.resp_packets = 0;
	c->ex.start_ns = now;
	c->ex.end_ns = now;
	c->ex.req_bytes = len;
	c->ex.resp_bytes = 0;
	return CLV_TAKEN;
}

/* A response segment of a paired connection. */
static __always_inline int on_response(struct __sk_buff *skb, struct clv_pkt *p,
				       struct clv_conn *c, __u64 now, __u8 hook)
{
	__u32 seq = bpf_ntohl(p->seq), ack = bpf_ntohl(p->ack), len = p->payload_len;
	__u32 status, behind, zero = 0;
	__u64 held = held_resp(), n, rl = c->ex.req_head_len, hl;
	__u16 gso = gso_of(skb);
	__u8 phase = c->phase;
	struct clv_scan *sc;
	__s64 cl, extra;
	int net_off;
	__s32 d;

	if (!(c->flags & CLV_CONN_RESP_KNOWN)) {
		/* Picked up mid-stream: the response stream's position is not
		 * known.  A response whose ack does not pass the request's
		 * first byte answers one never seen (as user space decides). */
		if (phase == CLV_PHASE_IDLE || (__s32)(ack - c->ex.req_seq) <= 0)
			return CLV_IGNORED;
		if (phase != CLV_PHASE_WAIT)
			return CLV_HO_EARLY;
		/* the answer to a complete request starts here */
		c->resp_next = seq;
		c->flags |= CLV_CONN_RESP_KNOWN;
	}
	d = seq - c->resp_next;
	behind = c->resp_next - seq;
	if (phase == CLV_PHASE_RESPONSE) {
		if (d < 0) {
			if (behind >= len)
				return CLV_IGNORED;
			len -= behind;
		} else if (d > 0) {
			return CLV_HO_ORDER;
		}
		if (len > c->resp_left)
			return CLV_HO_PIPELINE;
		c->resp_left -= len;
		c->resp_next += len;
		c->ex.resp_bytes += len;
		c->ex.resp_packets += gso;
		c->ex.end_ns = now;
		c->resp_body_ts = now;
		c->resp_body_ack = ack;
		if (!c->resp_left)
			finish(c);
		return CLV_TAKEN;
	}
	if (d < 0 && behind >= len)
		return CLV_IGNORED;
	if (phase == CLV_PHASE_IDLE)
		return CLV_HO_RESPONSE; /* a response to no request */
	if (phase == CLV_PHASE_REQUEST)
		return CLV_HO_EARLY;
	if (d != 0)
		return CLV_HO_ORDER;
	/* phase WAIT: a response head starts here */
	if (rl > held_req())
		return CLV_HO_RESPONSE;
	n = len < held ? len : held;
	barrier_var(n);
	if (n < 16 || n > CLV_RESP_HEAD_MAX)
		return CLV_HO_RESPONSE;
	sc = bpf_map_lookup_elem(&heads, &zero);
	if (!sc)
		return CLV_HO_RESPONSE;
	net_off = find_net_off(skb, p->l3head);
	if (load_l3(skb, net_off, p->payload_off, c->data + rl, n)) /* after the request head */
		return CLV_HO_RESPONSE;
	if (clv_parse_response(c, sc, rl, n, held))
		return CLV_HO_RESPONSE;
	status = sc->status;
	cl = sc->body;
	if (c->ex.method == CLV_METHOD_HEAD || status == 204 || status == 304)
		cl = 0;
	else if (cl < 0)
		return CLV_HO_RESPONSE; /* delimited by the connection closing */
	hl = sc->len;
	extra = (__s64)len - (__s64)hl;
	if (extra > cl)
		return CLV_HO_PIPELINE;
	hold_seg(&c->resp_seg, now, seq, ack, len, gso, p->flags, hook);
	c->flags |= CLV_CONN_RESP_KNOWN;
	c->resp_next = seq + len;
	c->resp_left = cl - extra;
	c->resp_body_ts = now;
	c->resp_body_ack = ack;
	c->ex.status = status;
	c->ex.resp_head_len = hl;
	c->ex.resp_bytes = len;
	c->ex.resp_packets = gso;
	c->ex.end_ns = now;
	c->phase = CLV_PHASE_RESPONSE;
	c->ex.phase = CLV_PHASE_RESPONSE;
	if (!c->resp_left)
		finish(c);
	return CLV_TAKEN;
}

/* The current segment as a clv_segment record (dir/role/proto restored:
 * the scratch header may have served as a template or a held record). */
static __always_inline void emit_as(struct __sk_buff *skb, struct clv_pkt *p,
				    struct clv_scratch *s, __u8 hook, __u8 dir, __u8 role)
{
	s->hdr.dir = dir;
	s->hdr.role = role;
	s->hdr.proto = CLV_PROTO_HTTP;
	emit(skb, p, s, hook);
}

/* A connection handed over (or picked up mid-message): every segment
 * crosses; the entry only remembers that, until RST or both FINs. */
static __always_inline void segments(struct __sk_buff *skb, struct clv_pkt *p,
				     struct clv_scratch *s, __u8 hook, __u8 dir, __u8 role,
				     struct clv_conn *c, struct clv_conn_key *key)
{
	__u8 fin = dir == CLV_DIR_REQUEST ? CLV_CONN_FIN_REQ : CLV_CONN_FIN_RESP;
	__u8 flags = p->flags;

	emit_as(skb, p, s, hook, dir, role);
	if (flags & CLV_TCP_RST) {
		bpf_map_delete_elem(&conns, key);
	} else if ((flags & CLV_TCP_SYN) && dir == CLV_DIR_REQUEST && !(flags & CLV_TCP_ACK) &&
		   !p->payload_len) {
		/* a new connection on the same addresses: unknown again */
		bpf_map_delete_elem(&conns, key);
	} else if (flags & CLV_TCP_FIN) {
		if ((c->flags | fin) == (c->flags | CLV_CONN_FIN_REQ | CLV_CONN_FIN_RESP))
			bpf_map_delete_elem(&conns, key);
		else
			c->flags |= fin;
	}
}

/* A SYN (or SYN-ACK) of a connection `conns` does not know yet: remember
 * where its streams start, for its first payload (see `syns`). */
static __noinline void remember_syn(struct clv_pkt *p, __u8 dir, struct clv_conn_key *key)
{
	struct clv_syn fresh = {}, *syn;
	__u32 next;

	if (!p || !key)
		return;
	next = bpf_ntohl(p->seq) + 1;
	if (dir == CLV_DIR_REQUEST) {
		if (p->flags & CLV_TCP_ACK)
			return;
		fresh.req_next = next;
		fresh.flags = CLV_SYN_REQUEST;
		bpf_map_update_elem(&syns, key, &fresh, BPF_ANY);
		return;
	}
	syn = bpf_map_lookup_elem(&syns, key);
	if (syn) {
		syn->resp_next = next;
		syn->flags |= CLV_SYN_RESPONSE;
	}
}

/*
 * A segment of a connection `conns` does not know.  Entries are made by the
 * first payload, not by the SYN: a connection costs no entry (only a small
 * `syns` one) until it carries data.  A segment that starts with a request
 * method may start a request head: the connection is paired from there (the
 * caller frames the head, or hands over at it).  Anything else leaves the
 * connection to user space, from this segment on; if it is the first byte
 * after the SYN, a clv_handover record says so first, so that user space
 * reads it as the start of the stream (a TLS hello, an HTTP/2 preface or
 * garbage there is what it is, not bytes of a connection picked up
 * mid-stream).
 */
static __always_inline struct clv_conn *unknown(struct __sk_buff *skb, struct clv_pkt *p,
						struct clv_scratch *s, __u8 hook, __u8 dir,
						__u8 role, struct clv_conn_key *key)
{
	__u64 first = 0, mlen;
	struct clv_syn *syn, start = {};
	struct clv_conn *c;
	__u32 seq = bpf_ntohl(p->seq);
	int net_off;

	if (!p->payload_len) {
		if (p->flags & CLV_TCP_SYN)
			remember_syn(p, dir, key);
		return NULL; /* a SYN, FIN or RST alone: nothing to say yet */
	}
	syn = bpf_map_lookup_elem(&syns, key);
	if (syn) {
		start = *syn;
		bpf_map_delete_elem(&syns, key);
		if (dir != CLV_DIR_REQUEST || !(start.flags & CLV_SYN_REQUEST) ||
		    start.req_next != seq)
			start.flags = 0; /* not the stream's first byte: as if never seen */
	}
	if (dir == CLV_DIR_REQUEST && !(p->flags & CLV_TCP_SYN) && p->payload_len >= 18) {
		net_off = find_net_off(skb, p->l3head);
		if (!load_l3(skb, net_off, p->payload_off, &first, sizeof(first)) &&
		    clv_method(first, &mlen) != CLV_METHOD_NONE) {
			c = conn_new(key, s, CLV_MODE_PAIRED, seq);
			if (c && (start.flags & CLV_SYN_RESPONSE)) {
				c->resp_next = start.resp_next;
				c->flags |= CLV_CONN_RESP_KNOWN;
			}
			return c;
		}
	}
	c = conn_new(key, s, CLV_MODE_SEGMENTS, seq);
	if (c && (start.flags & CLV_SYN_REQUEST)) {
		c->flags |= CLV_CONN_AT_START;
		if (start.flags & CLV_SYN_RESPONSE) {
			c->resp_next = start.resp_next;
			c->flags |= CLV_CONN_RESP_KNOWN;
		}
		handover(c, s, key, CLV_HO_REQUEST, bpf_ktime_get_ns());
	}
	emit_as(skb, p, s, hook, dir, role);
	return NULL;
}

/* A segment of a paired connection, with its lock held (released here). */
static __always_inline void paired(struct __sk_buff *skb, struct clv_pkt *p,
				   struct clv_scratch *s, __u8 hook, __u8 dir, __u8 role,
				   struct clv_conn *c, struct clv_conn_key *key)
{
	__u64 now = bpf_ktime_get_ns();
	__u8 flags = p->flags;
	int rc = CLV_TAKEN;

	c->last_ns = now;
	if (flags & CLV_TCP_SYN) {
		if (p->payload_len) {
			rc = CLV_HO_REQUEST; /* TCP Fast Open: user space frames it */
		} else if (c->phase != CLV_PHASE_IDLE) {
			rc = dir == CLV_DIR_REQUEST ? CLV_HO_REUSE : CLV_HO_ORDER;
		} else if (dir == CLV_DIR_REQUEST) {
			c->req_next = bpf_ntohl(p->seq) + 1; /* (again: a new connection) */
			c->flags = 0;
		} else {
			c->resp_next = bpf_ntohl(p->seq) + 1;
			c->flags |= CLV_CONN_RESP_KNOWN;
		}
	} else if (p->payload_len) {
		rc = dir == CLV_DIR_REQUEST ? on_request(skb, p, c, now, hook)
					    : on_response(skb, p, c, now, hook);
	}
	if (rc <= 0 && (flags & (CLV_TCP_FIN | CLV_TCP_RST))) {
		if (c->phase == CLV_PHASE_IDLE) {
			/* the connection ends with nothing pending */
			c->mode = CLV_MODE_DEAD;
			conn_unlock(c);
			bpf_map_delete_elem(&conns, key);
			return;
		}
		/* its payload (if any) is held now and goes again below: user
		 * space drops the copy by sequence number */
		rc = CLV_HO_END;
	}
	if (rc <= 0) {
		if (!conn_unlock(c))
			return;
		/* a CPU gave up waiting and sent its segment: hand over */
		if (!conn_lock(c))
			return;
		handover(c, s, key, CLV_HO_CONTENDED, now);
		c->mode = CLV_MODE_SEGMENTS;
		c->phase = CLV_PHASE_IDLE;
		conn_unlock(c);
		return;
	}
	handover(c, s, key, rc, now);
	emit_as(skb, p, s, hook, dir, role);
	c->phase = CLV_PHASE_IDLE;
	if (flags & CLV_TCP_RST) {
		c->mode = CLV_MODE_DEAD;
		conn_unlock(c);
		bpf_map_delete_elem(&conns, key);
		return;
	}
	if (flags & CLV_TCP_FIN)
		c->flags |= dir == CLV_DIR_REQUEST ? CLV_CONN_FIN_REQ : CLV_CONN_FIN_RESP;
	c->mode = CLV_MODE_SEGMENTS;
	conn_unlock(c);
}

static __always_inline void http(struct __sk_buff *skb, struct clv_pkt *p, struct clv_scratch *s,
				 __u8 hook)
{
	struct clv_conn_key key;
	struct clv_conn *c;
	__u8 dir = s->hdr.dir, role = s->hdr.role;

	conn_key(skb->ifindex, p, dir, role, &key);
	c = bpf_map_lookup_elem(&conns, &key);
	if (!c) {
		c = unknown(skb, p, s, hook, dir, role, &key);
		if (!c)
			return;
	}
	if (*(volatile __u8 *)&c->mode != CLV_MODE_PAIRED) {
		segments(skb, p, s, hook, dir, role, c, &key);
		return;
	}
	if (!conn_lock(c)) {
		/* the holder hands over when it unlocks; this segment goes now */
		count(CLV_CNT_HO_CONTENDED);
		emit_as(skb, p, s, hook, dir, role);
		return;
	}
	if (c->mode != CLV_MODE_PAIRED || !same_key(&c->ex, &key)) {
		/* handed over meanwhile, or the element now holds another key */
		conn_unlock(c);
		emit_as(skb, p, s, hook, dir, role);
		return;
	}
	paired(skb, p, s, hook, dir, role, c, &key);
}

static __always_inline int classify(struct __sk_buff *skb, __u8 hook)
{
	struct clv_pkt p;
	struct clv_scratch *s;
	__u32 zero = 0;
	int rc;

	/* p lives on the stack: in registers, a field left unset on a path that
	 * returns early is one the verifier refuses to spill */
	asm volatile("" : : "r"(&p) : "memory");
	count(CLV_CNT_PACKETS);
	rc = parse(skb, &p);
	if (rc != CLV_PARSE_TCP) {
		if (rc == CLV_PARSE_BAD)
			count(CLV_CNT_MALFORMED);
		return TC_ACT_UNSPEC;
	}
	/* pure ACKs never cross, and are filtered before any lookup */
	if (p.payload_len == 0 && !(p.flags & CLV_TCP_REPORT))
		return TC_ACT_UNSPEC;
	s = bpf_map_lookup_elem(&scratch, &zero);
	if (!s)
		return TC_ACT_UNSPEC;
	if (!match(skb->ifindex, &p, &s->hdr))
		return TC_ACT_UNSPEC;
	count(CLV_CNT_MATCHED);
	if (settings.pair_http && s->hdr.proto == CLV_PROTO_HTTP)
		http(skb, &p, s, hook);
	else
		emit(skb, &p, s, hook);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int clv_tc_ingress(struct __sk_buff *skb)
{
	return classify(skb, CLV_HOOK_INGRESS);
}

SEC("tc")
int clv_tc_egress(struct __sk_buff *skb)
{
	return classify(skb, CLV_HOOK_EGRESS);
}
