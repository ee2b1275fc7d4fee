/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The ABI between the eBPF classifier (clovisor.bpf.c) and user space
 * (src/clovisor/kernel/abi.py mirrors every struct here; a test checks that
 * both layouts agree).  Rules: natural alignment, no implicit padding (the
 * build uses -Wpadded), explicit pad fields that are always zero, a type byte
 * first in every ring buffer record.
 */
#ifndef CLOVISOR_H
#define CLOVISOR_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* Upper bound of the per-segment payload prefix (--capture-bytes). */
#define CLV_CAPTURE_MAX 8192
/* Bytes copied from the end of a segment whose payload exceeds the prefix:
 * enough to see the last-chunk marker "\r\n0\r\n\r\n" of a chunked body. */
#define CLV_TAIL_LEN 16

enum clv_event_type {
	CLV_EV_SEGMENT = 1,  /* struct clv_segment */
	CLV_EV_EXCHANGE = 2, /* struct clv_exchange: an HTTP/1.x exchange paired in the kernel */
	CLV_EV_HANDOVER = 3, /* struct clv_handover: a connection's segments follow from here */
};

/* Direction of a segment within its session, decided by the port tables. */
enum clv_dir {
	CLV_DIR_REQUEST = 0,  /* client -> server */
	CLV_DIR_RESPONSE = 1, /* server -> client */
};

enum clv_role {
	CLV_ROLE_SERVER = 1, /* the traced workload is the server (--port) */
	CLV_ROLE_CLIENT = 2, /* the traced workload is the client (--egress) */
};

enum clv_proto {
	CLV_PROTO_TCP = 1,  /* connection-level sessions only */
	CLV_PROTO_HTTP = 2, /* HTTP/1.x */
	CLV_PROTO_HTTP2 = 3, /* HTTP/2 (h2c, prior knowledge) */
	CLV_PROTO_GRPC = 4, /* gRPC: HTTP/2 streams as RPCs */
	/* parser plugins get the ids above */
};

enum clv_hook {
	CLV_HOOK_INGRESS = 0,
	CLV_HOOK_EGRESS = 1,
};

/* TCP flag bits as they appear in clv_segment.tcp_flags. */
#define CLV_TCP_FIN 0x01
#define CLV_TCP_SYN 0x02
#define CLV_TCP_RST 0x04
#define CLV_TCP_PSH 0x08
#define CLV_TCP_ACK 0x10

/* One ring buffer record per payload-carrying (or SYN/FIN/RST) TCP segment
 * of a traced flow; cap_len payload bytes follow the struct. */
struct clv_segment {
	__u8 type;        /* CLV_EV_SEGMENT */
	__u8 dir;         /* enum clv_dir */
	__u8 role;        /* enum clv_role */
	__u8 proto;       /* enum clv_proto */
	__u8 family;      /* 4 or 6 */
	__u8 tcp_flags;   /* CLV_TCP_* */
	__u8 hook;        /* enum clv_hook */
	__u8 tail_len;    /* valid bytes at the start of tail[] */
	__u64 ts_ns;      /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 ifindex;
	__u32 seq;        /* host byte order */
	__u32 ack;
	__u32 payload_len; /* TCP payload bytes of this skb (all of them) */
	__u8 saddr[16];   /* IPv4: first 4 bytes, rest zero */
	__u8 daddr[16];
	__u16 sport;      /* host byte order */
	__u16 dport;
	__u16 cap_len;    /* payload prefix bytes that follow */
	__u16 gso_segs;   /* wire packets this skb stands for, >= 1 */
	__u8 tail[CLV_TAIL_LEN]; /* last tail_len payload bytes, when not in the prefix */
};

/*
 * HTTP/1.x pairing (clv_settings.pair_http).  The classifier follows each
 * HTTP connection in the `conns` LRU map.  While an exchange is framed
 * exactly (a request head at a segment start ending within the capture, a
 * Content-Length or no body, a response head likewise, every segment in
 * order), nothing crosses to user space until the response ends: then one
 * clv_exchange record.  Anything else hands the connection over: a
 * clv_handover record with the message boundaries, the held segments
 * again as clv_segment records, then every segment as before.
 */

/* Request methods the classifier pairs (clv_exchange.method, clv_red_key). */
enum clv_method {
	CLV_METHOD_NONE = 0,
	CLV_METHOD_GET = 1,
	CLV_METHOD_HEAD = 2,
	CLV_METHOD_POST = 3,
	CLV_METHOD_PUT = 4,
	CLV_METHOD_DELETE = 5,
	CLV_METHOD_OPTIONS = 6,
	CLV_METHOD_PATCH = 7,
	CLV_METHOD_TRACE = 8,
};

/* Where an exchange held in `conns` stands (clv_conn.phase). */
enum clv_phase {
	CLV_PHASE_IDLE = 0,     /* between exchanges: nothing held */
	CLV_PHASE_REQUEST = 1,  /* request head seen, body bytes to come */
	CLV_PHASE_WAIT = 2,     /* request complete, no response yet */
	CLV_PHASE_RESPONSE = 3, /* response head seen, body bytes to come */
};

/* How a connection in `conns` is reported (clv_conn.mode). */
enum clv_mode {
	CLV_MODE_PAIRED = 1,   /* exchanges are framed in the kernel */
	CLV_MODE_SEGMENTS = 2, /* every segment crosses (handed over, or picked up mid-message) */
	CLV_MODE_DEAD = 3,     /* being deleted */
};

/* Why a connection was handed over (clv_handover.reason, CLV_CNT_HO_*). */
enum clv_handover_reason {
	CLV_HO_REQUEST = 1,   /* a request head the classifier does not frame */
	CLV_HO_RESPONSE = 2,  /* likewise a response head (1xx, no length, chunked, too long) */
	CLV_HO_PIPELINE = 3,  /* bytes beyond a message: a request before the response ended */
	CLV_HO_EARLY = 4,     /* a response before its request ended (or 100-continue) */
	CLV_HO_ORDER = 5,     /* a segment out of order */
	CLV_HO_END = 6,       /* FIN or RST with an exchange pending */
	CLV_HO_REUSE = 7,     /* a new SYN with an exchange pending */
	CLV_HO_CONTENDED = 8, /* two CPUs at once on one connection, the lock not won */
	CLV_HO__MAX = 9,
};

/* clv_handover.synced: which boundaries are known. */
#define CLV_SYNC_REQUEST 0x01
#define CLV_SYNC_RESPONSE 0x02
#define CLV_SYNC_START 0x04 /* req_seq is the stream's first byte (its SYN was seen) */

/* One ring record per exchange paired in the kernel; req_head_len request
 * head bytes follow, then resp_head_len response head bytes.  The same
 * struct is held in `conns` while the exchange is pending (phase != 0). */
struct clv_exchange {
	__u8 type;          /* CLV_EV_EXCHANGE */
	__u8 role;          /* enum clv_role */
	__u8 family;        /* 4 or 6 */
	__u8 method;        /* enum clv_method */
	__u8 phase;         /* 0 in a ring record; enum clv_phase when held */
	__u8 pad;
	__u16 status;       /* 0: no response head yet */
	__u16 req_head_len; /* header block bytes, CRLFCRLF included */
	__u16 resp_head_len;
	__u16 cport;        /* client port, host byte order */
	__u16 sport;        /* server port */
	__u32 ifindex;
	__u32 req_seq;      /* sequence number of the first request byte */
	__u32 req_ack;      /* the ack number the request head carried */
	__u32 req_packets;  /* wire packets (GSO segments) */
	__u32 resp_packets;
	__u32 pad2;
	__u64 start_ns;     /* first request byte (bpf_ktime_get_ns) */
	__u64 end_ns;       /* last response byte (held: the last segment so far) */
	__u64 req_bytes;    /* TCP payload bytes of the request, head and body */
	__u64 resp_bytes;
	__u8 caddr[16];     /* client address; IPv4: first 4 bytes */
	__u8 saddr[16];     /* server address */
};

/* The classifier stops pairing a connection: its clv_segment records follow
 * (first the held ones, from the boundaries given here). */
struct clv_handover {
	__u8 type;     /* CLV_EV_HANDOVER */
	__u8 role;
	__u8 family;
	__u8 reason;   /* enum clv_handover_reason */
	__u8 synced;   /* CLV_SYNC_*: which of req_seq/resp_seq are known */
	__u8 pad;
	__u16 cport;
	__u16 sport;
	__u16 pad2;
	__u32 ifindex;
	__u32 req_seq;  /* first byte of the pending (or next) request */
	__u32 resp_seq; /* first byte of the pending (or next) response */
	__u64 ts_ns;
	__u8 caddr[16];
	__u8 saddr[16];
};

/* Key of `conns`: a connection, oriented client -> server. */
struct clv_conn_key {
	__u32 ifindex;
	__u8 role;
	__u8 family;
	__u16 cport;
	__u16 sport;
	__u16 pad;
	__u8 caddr[16];
	__u8 saddr[16];
};

/* A segment held in `conns` (a request or response head), to be sent again
 * as a clv_segment if the connection is handed over. */
struct clv_held_seg {
	__u64 ts_ns;
	__u32 seq;
	__u32 ack;
	__u32 payload_len;
	__u16 gso_segs;
	__u8 tcp_flags;
	__u8 hook;
};

/* Response head bytes held per connection: a longer head is handed over. */
#define CLV_RESP_HEAD_MAX 672
/* Request head bytes held: min(capture_bytes, this); longer heads hand over. */
#define CLV_REQ_HEAD_MAX 1024
/* Bytes past the held ones that the head scan may read (never trusted). */
#define CLV_SCAN_SLACK 32
/* A Content-Length above this is handed over (a held body is re-sent as one
 * record, whose length must stay far from the 32-bit sequence space). */
#define CLV_BODY_MAX (1LL << 30)

/* clv_conn.flags */
#define CLV_CONN_RESP_KNOWN 0x01 /* resp_next is the response stream's next byte */
#define CLV_CONN_FIN_REQ 0x02    /* SEGMENTS: the client sent FIN */
#define CLV_CONN_FIN_RESP 0x04   /* SEGMENTS: the server sent FIN */
#define CLV_CONN_AT_START 0x08   /* req_next is the stream's first byte (after its SYN) */

/* The held head bytes of a connection: the request head, the response head
 * right after it, and room for the head scan to read past them. */
#define CLV_HELD_BYTES (CLV_REQ_HEAD_MAX + CLV_RESP_HEAD_MAX + CLV_SCAN_SLACK)

/*
 * Value of `conns`: the state of one connection and the heads it holds.
 * 1952 bytes: with the kernel's 48-byte element header and the 48-byte
 * key, an element is 2048 bytes, so no element straddles two pages.  The
 * fields a segment always touches come first: they share a cache line with
 * the end of the key, which the lookup has just read.
 */
struct clv_conn {
	__u64 lock;          /* 0 free, 1 taken (compare-and-swap) */
	__u8 mode;           /* enum clv_mode */
	__u8 phase;          /* enum clv_phase */
	__u8 flags;          /* CLV_CONN_* */
	__u8 pad;
	__u32 req_next;      /* next request byte expected */
	__u32 resp_next;     /* next response byte expected (CLV_CONN_RESP_KNOWN) */
	__u32 req_body_ack;  /* ack of the last request body segment */
	__u64 req_left;      /* request body bytes still to come */
	__u64 resp_left;
	__u64 last_ns;       /* the last segment of the connection (idle timeout) */
	__u64 req_body_ts;   /* the last request body segment */
	__u64 resp_body_ts;
	__u32 resp_body_ack;
	__u32 pad2;
	struct clv_held_seg req_seg;  /* the request head's segment */
	struct clv_held_seg resp_seg; /* the response head's segment */
	/* The exchange, as its record will be sent; its addresses and ports are
	 * also the entry's own key (checked under the lock: an element reused
	 * for another connection is noticed). */
	struct clv_exchange ex;
	__u8 data[CLV_HELD_BYTES]; /* the record's bytes follow its header */
};

/* Value of `syns` (keyed like `conns`): where a connection's byte streams
 * start, from its SYN and SYN-ACK, until its first payload.  Without it the
 * classifier could not tell a new connection's first bytes (a TLS hello, an
 * HTTP/2 preface, garbage) from bytes of one picked up mid-stream. */
#define CLV_SYN_REQUEST 0x01  /* req_next is known (the client's SYN seen) */
#define CLV_SYN_RESPONSE 0x02 /* resp_next is known (the server's SYN-ACK seen) */
struct clv_syn {
	__u32 req_next;  /* the client's ISN + 1 */
	__u32 resp_next; /* the server's ISN + 1 */
	__u32 flags;     /* CLV_SYN_* */
	__u32 pad;
};

/* RED metrics of the exchanges whose record did not reach user space (ring
 * full, or shed): a per-CPU hash {ifindex, port, role, method, status} ->
 * duration histogram over the OpenTelemetry HTTP buckets. */
#define CLV_RED_BUCKETS 15 /* 14 bounds, 5 ms .. 10 s, then +Inf */
struct clv_red_key {
	__u32 ifindex;
	__u16 port;   /* the server port */
	__u8 role;
	__u8 method;  /* enum clv_method */
	__u16 status;
	__u16 pad;
};

struct clv_red {
	__u64 count;
	__u64 sum_ns;
	__u64 buckets[CLV_RED_BUCKETS]; /* not cumulative: bucket i counts bound[i-1] < d <= bound[i] */
};

/*
 * HTTP/2 frame headers the capture missed.  On flows of ports declared
 * http2 or grpc, the classifier follows each direction's frame boundaries
 * from the SYN on (per-flow state in the `h2_flows` map) and appends to the
 * segment's record one clv_h2_frame per frame header that does not lie
 * whole in the captured prefix: `(size - sizeof(clv_segment) - cap_len) /
 * sizeof(clv_h2_frame)` of them follow the payload bytes.  So a body sent as
 * many frames per (GSO) segment keeps its framing however little is
 * captured.  A header split across two segments is not reported: its bytes
 * are in the first one's tail and the next one's prefix.
 */
#define CLV_H2_FRAMES_MAX 256 /* frame headers walked (and so reported, at most) per segment */
#define CLV_H2_PEEK 48       /* payload bytes copied of a non-DATA frame */

struct clv_h2_frame {
	__u32 offset;            /* of the frame header, from the segment's first payload byte */
	__u8 head[9];            /* the 9-byte frame header as on the wire */
	__u8 peek_len;           /* valid bytes in peek[] */
	__u8 pad[2];
	__u8 peek[CLV_H2_PEEK];  /* its first payload bytes (HEADERS, RST_STREAM, ...; not DATA) */
};

/* `h2_flows` key: one direction of a flow on one interface. */
struct clv_h2_key {
	__u32 ifindex;
	__u16 sport;
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* `h2_flows` value: where that direction's next frame header starts. */
struct clv_h2_state {
	__u32 next_seq; /* sequence number of its first byte */
	__u8 have;      /* 1-8: that many of its bytes ended the last segment (in part[]) */
	__u8 pad[3];
	__u8 part[8];   /* the last segment's last 8 bytes, when have > 0 */
};

/* Server ports of a traced interface: {ifindex, port} -> protocol. */
struct clv_port_key {
	__u32 ifindex;
	__u16 port;
	__u16 pad;
};

/* Egress matches: {ifindex, port, family, addr} -> protocol; family 0 with
 * an all-zero addr is the "any address" rule (the original's IP "0"). */
struct clv_egress_key {
	__u32 ifindex;
	__u16 port;
	__u8 family;
	__u8 pad;
	__u8 addr[16];
};

/* The `port_bits` array map: CLV_PORT_WORDS __u64 words, bit (port % 64) of
 * word (port / 64) set while any interface has a `ports` entry for that port.
 * An array lookup is inlined by the verifier: a packet of an untraced port
 * costs no hash lookup at all. */
#define CLV_PORT_WORDS 1024

/* Which egress rules exist for a {ifindex, port}: carried in the `ports`
 * entry so that a packet of an untraced port costs two lookups, not six. */
#define CLV_EGRESS_ANY 0x01 /* a family 0 / any-address rule */
#define CLV_EGRESS_V4 0x02  /* at least one exact IPv4 rule */
#define CLV_EGRESS_V6 0x04  /* at least one exact IPv6 rule */

/* Value of both maps.  In `ports`, proto 0 means "not a server port, only
 * egress rules" and egress holds CLV_EGRESS_* bits; in `egress`, egress is 0. */
struct clv_match {
	__u8 proto;  /* enum clv_proto; 0 = no server port */
	__u8 egress; /* CLV_EGRESS_* (ports map only) */
	__u8 pad[2];
};

/* Kernel-side counters: a per-CPU array indexed by this enum. */
enum clv_counter {
	CLV_CNT_PACKETS = 0,  /* packets the classifier ran on */
	CLV_CNT_MATCHED = 1,  /* packets of traced flows */
	CLV_CNT_EVENTS = 2,   /* records written to the ring buffer */
	CLV_CNT_LOST = 3,     /* records lost: ring buffer full */
	CLV_CNT_MALFORMED = 4, /* truncated or unparsable headers */
	CLV_CNT_EXCHANGES = 5, /* exchange records written to the ring */
	CLV_CNT_SHED = 6,      /* exchange records shed: the ring had less than shed_bytes free */
	CLV_CNT_HANDOVERS = 7, /* connections handed over (CLV_CNT_HO_* say why) */
	CLV_CNT_HO_REQUEST = 8,
	CLV_CNT_HO_RESPONSE = 9,
	CLV_CNT_HO_PIPELINE = 10,
	CLV_CNT_HO_EARLY = 11,
	CLV_CNT_HO_ORDER = 12,
	CLV_CNT_HO_END = 13,
	CLV_CNT_HO_REUSE = 14,
	CLV_CNT_HO_CONTENDED = 15,
	CLV_CNT__MAX = 16,
};

/* clv_settings.wakeup_bytes: no record wakes the reader, which drains the
 * ring on a timer (the cheapest per packet: no ring query, no irq_work). */
#define CLV_WAKEUP_NEVER 0xffffffffU

/* Load-time settings: the only variable in .rodata (const volatile). */
struct clv_settings {
	__u32 capture_bytes;  /* payload prefix per segment, <= CLV_CAPTURE_MAX */
	__u32 wakeup_bytes;   /* wake user space once this much data is queued;
	                       * 0: wake it for every record; CLV_WAKEUP_NEVER */
	__u32 pair_http;      /* 1: pair HTTP/1.x exchanges in the kernel */
	__u32 shed_bytes;     /* shed exchange records while less ring space is
	                       * free (0: never shed) */
};

#endif /* CLOVISOR_H */
