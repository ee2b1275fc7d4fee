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
	CLV_EV_SEGMENT = 1,
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
	CLV_CNT__MAX = 5,
};

/* clv_settings.wakeup_bytes: no record wakes the reader, which drains the
 * ring on a timer (the cheapest per packet: no ring query, no irq_work). */
#define CLV_WAKEUP_NEVER 0xffffffffU

/* Load-time settings: the only variable in .rodata (const volatile). */
struct clv_settings {
	__u32 capture_bytes;  /* payload prefix per segment, <= CLV_CAPTURE_MAX */
	__u32 wakeup_bytes;   /* wake user space once this much data is queued;
	                       * 0: wake it for every record; CLV_WAKEUP_NEVER */
};

#endif /* CLOVISOR_H */
