// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Clovisor's classifier: one TCX (or clsact) program per hook that reports
 * the payload-carrying and SYN/FIN/RST TCP segments of traced flows to user
 * space through a BPF ring buffer.
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
 *  - every record that cannot be written is counted (CLV_CNT_LOST).
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

/* Dual-licensed (SPDX line above); the kernel is told the GPL option. */
char LICENSE[] SEC("license") = "GPL";

/* Written by the loader before load (frozen .rodata): the verifier sees the
 * values as constants and prunes what they disable. */
const volatile struct clv_settings settings = {
	.capture_bytes = 256,
	.wakeup_bytes = 0,
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

static __always_inline void emit(struct __sk_buff *skb, struct clv_pkt *p,
				 struct clv_scratch *s, __u8 hook)
{
	__u64 flags = BPF_RB_NO_WAKEUP, avail, wake, size, frames;
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
	/*
	 * Batch wake-ups: wake the reader only when this record makes the
	 * unread data cross wakeup_bytes.  Above the threshold the reader is
	 * already woken (a level-triggered epoll does not lose it), and waking
	 * again per record would cost an irq_work each; below it, the reader's
	 * poll timeout bounds the latency.  wakeup_bytes 0: wake every record;
	 * CLV_WAKEUP_NEVER: never, the reader drains on a timer, and the ring
	 * is not even queried (measured: about 60 ns less per packet).
	 */
	wake = settings.wakeup_bytes;
	if (wake == CLV_WAKEUP_NEVER) {
		flags = BPF_RB_NO_WAKEUP;
	} else if (wake == 0) {
		flags = BPF_RB_FORCE_WAKEUP;
	} else {
		avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
		if (avail < wake && avail + size >= wake)
			flags = BPF_RB_FORCE_WAKEUP;
	}
	if (bpf_ringbuf_output(&events, s, size, flags))
		count(CLV_CNT_LOST);
	else
		count(CLV_CNT_EVENTS);
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
