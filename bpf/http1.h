/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * HTTP/1.x header blocks as the classifier frames them (clovisor.bpf.c).
 *
 * A head is accepted only where user space (src/clovisor/core/http1.py,
 * parse_head) frames it the same way; anything unusual is refused, and the
 * connection is then handed over to user space, which stays the truth.
 * Every function reads a buffer `d` of which the first `n` bytes are valid
 * and up to CLV_SCAN_SLACK bytes past `n` may be read (they are stale: they
 * never decide anything).  Words are loaded 8 bytes at a time, little
 * endian (BPF runs in the host's byte order; every supported host is
 * little endian).
 */
#ifndef CLOVISOR_HTTP1_H
#define CLOVISOR_HTTP1_H

#include <linux/types.h>
#include <stdbool.h>
#include <bpf/bpf_helpers.h>

#include "clovisor.h"

/* 8 bytes as a little-endian word */
#define CLV_LE8(a, b, c, d, e, f, g, h)                                                      \
	((__u64)(a) | (__u64)(b) << 8 | (__u64)(c) << 16 | (__u64)(d) << 24 |                 \
	 (__u64)(e) << 32 | (__u64)(f) << 40 | (__u64)(g) << 48 | (__u64)(h) << 56)

#define CLV_ONES 0x0101010101010101ULL
#define CLV_HIGHS 0x8080808080808080ULL
#define CLV_NEWLINES 0x0a0a0a0a0a0a0a0aULL
/* OR-ing 0x20 folds an ASCII letter to lower case; only letter bytes get it */
#define CLV_FOLD8 0x2020202020202020ULL

/*
 * `x` below `lim`, or the function returns false.  For the verifier: clang
 * may test a copy of `x` (or x + 2) and use another register for the
 * access; barrier_var makes it test the one it uses.  `lim` is a constant
 * to the verifier (it comes from the frozen settings).
 */
#define CLV_BOUND(x, lim)                                                                    \
	do {                                                                                 \
		barrier_var(x);                                                              \
		if ((x) >= (lim))                                                            \
			return false;                                                        \
	} while (0)

/* One 8-byte load at any alignment (x86-64 and arm64 JITs allow it; clang
 * would turn a memcpy into eight byte loads). */
static __always_inline __u64 clv_load64(const __u8 *d)
{
	return *(const __u64 *)d;
}

/* Non-zero iff a byte of x is zero (the lowest flagged byte is exact). */
static __always_inline __u64 clv_zero_bytes(__u64 x)
{
	return (x - CLV_ONES) & ~x & CLV_HIGHS;
}

/* Index of the lowest flagged byte of a clv_zero_bytes() result (BPF has
 * no count-trailing-zeros): isolate the bit, then a multiply puts the byte
 * index into the top byte. */
static __always_inline __u64 clv_first_flagged(__u64 z)
{
	return (((z & -z) >> 7) * 0x0001020304050607ULL) >> 56;
}

/*
 * The method at the start of a request: its enum clv_method, and in *len
 * the bytes up to and including the space after it.  0 for anything else,
 * CONNECT included (a tunnel is not paired).  Methods are case-sensitive.
 */
static __always_inline __u8 clv_method(__u64 w, __u64 *len)
{
	__u32 w4 = w;
	__u64 w5 = w & 0xffffffffffULL, w6 = w & 0xffffffffffffULL;
	__u64 w7 = w & 0xffffffffffffffULL;

	if (w4 == (__u32)CLV_LE8('G', 'E', 'T', ' ', 0, 0, 0, 0)) {
		*len = 4;
		return CLV_METHOD_GET;
	}
	if (w5 == CLV_LE8('P', 'O', 'S', 'T', ' ', 0, 0, 0)) {
		*len = 5;
		return CLV_METHOD_POST;
	}
	if (w5 == CLV_LE8('H', 'E', 'A', 'D', ' ', 0, 0, 0)) {
		*len = 5;
		return CLV_METHOD_HEAD;
	}
	if (w4 == (__u32)CLV_LE8('P', 'U', 'T', ' ', 0, 0, 0, 0)) {
		*len = 4;
		return CLV_METHOD_PUT;
	}
	if (w7 == CLV_LE8('D', 'E', 'L', 'E', 'T', 'E', ' ', 0)) {
		*len = 7;
		return CLV_METHOD_DELETE;
	}
	if (w6 == CLV_LE8('P', 'A', 'T', 'C', 'H', ' ', 0, 0)) {
		*len = 6;
		return CLV_METHOD_PATCH;
	}
	if (w == CLV_LE8('O', 'P', 'T', 'I', 'O', 'N', 'S', ' ')) {
		*len = 8;
		return CLV_METHOD_OPTIONS;
	}
	if (w6 == CLV_LE8('T', 'R', 'A', 'C', 'E', ' ', 0, 0)) {
		*len = 6;
		return CLV_METHOD_TRACE;
	}
	return CLV_METHOD_NONE;
}

/*
 * What a head parse carries and finds: per-CPU, in the `heads` map.  The
 * parsers' loops keep what they carry from one turn to the next (a
 * position, what was found so far) here, read and written through volatile
 * accesses: the verifier then sees the same state at every turn and needs
 * to check each turn's body only once.  The head itself is parsed where it
 * is held, in the connection's entry.
 */
struct clv_scan {
	__u64 pos;      /* loop state: the offset being read */
	__u64 line_end; /* offset of the start line's '\n' (0: not seen yet) */
	__u64 cl_at;    /* offset of a Content-Length value (0: none) */
	__u64 len;      /* result: header block length, CRLFCRLF included */
	__s64 body;     /* result: Content-Length; -1: none */
	__u32 status;   /* result: responses */
	__u32 method;   /* result: requests, enum clv_method */
};

#define CLV_GET(field) (*(volatile __u64 *)&(field))
#define CLV_SET(field, v) (*(volatile __u64 *)&(field) = (v))

/*
 * Find the end of the header block in d[0, n): the first CRLFCRLF.
 * On the way, note where the start line ends and where a Content-Length
 * value is.  Lines are split at '\n', as user space splits them.  Returns
 * false (the head is not framed here) for: no end within n, a
 * Transfer-Encoding field, a second Content-Length, a "Content-Length"
 * name not followed by ':', an empty line that is not CRLF after CRLF.
 * `max` (a constant) bounds n; each turn of the loop reads one word or
 * moves to the next line, `max / 4` turns at most.
 */
static __always_inline bool clv_scan_head(const __u8 *d, struct clv_scan *sc, __u64 n,
					  __u64 max)
{
	CLV_SET(sc->pos, 0);
	CLV_SET(sc->line_end, 0);
	CLV_SET(sc->cl_at, 0);
	for (__u64 k = 0; k < max / 4; k++) {
		__u64 pos = CLV_GET(sc->pos), w, z, p, q;
		__u8 c;

		if (pos >= n)
			return false;
		CLV_BOUND(pos, max);
		w = clv_load64(d + pos);
		z = clv_zero_bytes(w ^ CLV_NEWLINES);
		if (!z) {
			CLV_SET(sc->pos, pos + 8);
			continue;
		}
		p = pos + clv_first_flagged(z); /* a '\n' */
		q = p + 1;                      /* the next line */
		if (q + 2 > n)
			return false;
		CLV_BOUND(p, max);
		CLV_BOUND(q, max);
		if (!CLV_GET(sc->line_end))
			CLV_SET(sc->line_end, p); /* p > 0: the caller checked the first bytes */
		CLV_SET(sc->pos, q);
		c = d[q];
		if (c == '\r') {
			/* an empty line ends the block only as CRLF CRLF */
			if (d[q + 1] != '\n' || p == 0 || d[p - 1] != '\r')
				return false;
			sc->len = q + 2;
			return true;
		}
		if (c == '\n')
			return false;
		c |= 0x20;
		/* a Content-Length line needs 17 bytes: name, colon, a digit, LF */
		if ((c == 'c' || c == 't') && q + 17 <= n) {
			__u64 w1, w2;

			CLV_BOUND(q, max - 16);
			w1 = clv_load64(d + q);
			w2 = clv_load64(d + q + 8);
			if ((w1 | 0x0020202020202020ULL) ==
				    CLV_LE8('c', 'o', 'n', 't', 'e', 'n', 't', '-') &&
			    ((w2 | 0x0000202020202020ULL) & 0xffffffffffffULL) ==
				    CLV_LE8('l', 'e', 'n', 'g', 't', 'h', 0, 0)) {
				if (CLV_GET(sc->cl_at) || (__u8)(w2 >> 48) != ':')
					return false;
				CLV_SET(sc->cl_at, q + 15);
			} else if ((w1 | CLV_FOLD8) ==
				   CLV_LE8('t', 'r', 'a', 'n', 's', 'f', 'e', 'r')) {
				return false; /* Transfer-Encoding, or a name that starts alike */
			}
		}
	}
	return false;
}

static __always_inline bool clv_ows(__u8 c)
{
	return c == ' ' || c == '\t';
}

/*
 * The Content-Length value at sc->cl_at, inside the block: OWS, 1 to 18
 * digits, OWS, then CRLF or LF (user space strips the same and accepts only
 * digits); -1 for anything else.
 */
#define CLV_OWS_MAX 8
#define CLV_DIGITS_MAX 18
static __always_inline __s64 clv_content_length(const __u8 *d, struct clv_scan *sc, __u64 max)
{
	__u64 end = sc->len, value = 0, pos;
	__u8 c;

	CLV_SET(sc->pos, CLV_GET(sc->cl_at));
	for (int i = 0; i < CLV_OWS_MAX; i++) {
		pos = CLV_GET(sc->pos);
		CLV_BOUND(pos, max);
		if (pos >= end || !clv_ows(d[pos]))
			break;
		CLV_SET(sc->pos, pos + 1);
	}
	for (int i = 0; i <= CLV_DIGITS_MAX; i++) {
		pos = CLV_GET(sc->pos);
		CLV_BOUND(pos, max);
		if (pos >= end)
			return -1;
		c = d[pos];
		if (c < '0' || c > '9') {
			if (i == 0)
				return -1;
			break;
		}
		if (i == CLV_DIGITS_MAX)
			return -1;
		value = value * 10 + (c - '0');
		CLV_SET(sc->pos, pos + 1);
	}
	for (int i = 0; i < CLV_OWS_MAX; i++) {
		pos = CLV_GET(sc->pos);
		CLV_BOUND(pos, max);
		if (pos >= end || !clv_ows(d[pos]))
			break;
		CLV_SET(sc->pos, pos + 1);
	}
	pos = CLV_GET(sc->pos);
	CLV_BOUND(pos, max - 1);
	if (pos + 1 < end && d[pos] == '\r')
		pos++;
	if (pos < end && d[pos] == '\n')
		return value;
	return -1;
}

/* Bytes of the request target that user space would not take as one \S+
 * token: any byte <= 0x20 (stricter than \S, which only excludes
 * whitespace; a control byte in a target is handed over). */
static __always_inline __u64 clv_low_bytes(__u64 x)
{
	return (x - 0x2121212121212121ULL) & ~x & CLV_HIGHS;
}

/*
 * "METHOD SP target SP HTTP/1.x CRLF", the method `mlen` bytes with its
 * space: the target is not empty and has no byte <= 0x20, and the line
 * ends in " HTTP/1.0\r" or " HTTP/1.1\r".
 */
static __always_inline bool clv_request_line(const __u8 *d, struct clv_scan *sc, __u64 mlen,
					     __u64 max)
{
	__u64 line_end = CLV_GET(sc->line_end), end, pos, w;

	if (line_end < mlen + 11)
		return false;
	CLV_BOUND(line_end, max);
	end = line_end - 10;
	if (clv_load64(d + end) != CLV_LE8(' ', 'H', 'T', 'T', 'P', '/', '1', '.'))
		return false;
	if ((d[line_end - 2] != '0' && d[line_end - 2] != '1') || d[line_end - 1] != '\r')
		return false;
	CLV_SET(sc->pos, mlen);
	for (__u64 k = 0; k < max / 8 + 1; k++) {
		pos = CLV_GET(sc->pos);
		if (pos >= end)
			return true;
		CLV_BOUND(pos, max);
		w = clv_load64(d + pos);
		if (end - pos < 8) /* bytes past the target count as 0xff */
			w |= ~0ULL << ((end - pos) * 8);
		if (clv_low_bytes(w))
			return false;
		CLV_SET(sc->pos, pos + 8);
	}
	return false;
}

/*
 * The status of "HTTP/1.x NNN[ reason]" ending at line_end (its '\n'), as
 * user space's pattern reads it; 0 if it is not one.  d holds at least 16
 * bytes.
 */
static __always_inline __u32 clv_status_line(const __u8 *d, __u64 line_end)
{
	__u64 w = clv_load64(d);
	__u8 a = d[9], b = d[10], c = d[11], after = d[12];

	if (w != CLV_LE8('H', 'T', 'T', 'P', '/', '1', '.', '1') &&
	    w != CLV_LE8('H', 'T', 'T', 'P', '/', '1', '.', '0'))
		return 0;
	if (d[8] != ' ' || line_end < 12)
		return 0;
	if (a < '0' || a > '9' || b < '0' || b > '9' || c < '0' || c > '9')
		return 0;
	if (!(after == ' ' || (after == '\r' && line_end == 13) || line_end == 12))
		return 0;
	return (a - '0') * 100 + (b - '0') * 10 + (c - '0');
}

/*
 * The head of a request in c->data[0, n), n <= max (the held request bytes):
 * 0 if the classifier frames it (sc->len, sc->method, sc->body set), else
 * CLV_HO_REQUEST.  Global functions: the verifier checks their loops once,
 * not once per path that reaches them.
 */
__noinline int clv_parse_request(struct clv_conn *c, struct clv_scan *sc, __u64 n, __u64 max)
{
	const __u8 *d;
	__u64 mlen = 0;
	__u8 method;

	if (!c || !sc || max > CLV_REQ_HEAD_MAX || n < 18 || n > max)
		return CLV_HO_REQUEST;
	d = c->data;
	method = clv_method(clv_load64(d), &mlen);
	if (method == CLV_METHOD_NONE)
		return CLV_HO_REQUEST;
	if (!clv_scan_head(d, sc, n, CLV_REQ_HEAD_MAX) ||
	    !clv_request_line(d, sc, mlen, CLV_REQ_HEAD_MAX))
		return CLV_HO_REQUEST;
	sc->body = -1;
	if (CLV_GET(sc->cl_at)) {
		sc->body = clv_content_length(d, sc, CLV_REQ_HEAD_MAX);
		if (sc->body < 0 || sc->body > CLV_BODY_MAX)
			return CLV_HO_REQUEST;
	}
	sc->method = method;
	return 0;
}

/* The head of a response in c->data[at, at + n), at <= CLV_REQ_HEAD_MAX (it
 * follows the request head), n <= max (the held response bytes): 0 if
 * framed (sc->len, sc->status, sc->body set), else CLV_HO_RESPONSE.  1xx
 * (100-continue, 101) and statuses outside 100..599 are not framed here. */
__noinline int clv_parse_response(struct clv_conn *c, struct clv_scan *sc, __u64 at, __u64 n,
				  __u64 max)
{
	const __u8 *d;
	__u32 status;

	if (!c || !sc || at > CLV_REQ_HEAD_MAX || max > CLV_RESP_HEAD_MAX || n < 16 || n > max)
		return CLV_HO_RESPONSE;
	d = c->data + at;
	if (!clv_scan_head(d, sc, n, CLV_RESP_HEAD_MAX))
		return CLV_HO_RESPONSE;
	status = clv_status_line(d, CLV_GET(sc->line_end));
	if (status < 200 || status > 599)
		return CLV_HO_RESPONSE;
	sc->body = -1;
	if (CLV_GET(sc->cl_at)) {
		sc->body = clv_content_length(d, sc, CLV_RESP_HEAD_MAX);
		if (sc->body < 0 || sc->body > CLV_BODY_MAX)
			return CLV_HO_RESPONSE;
	}
	sc->status = status;
	return 0;
}

#endif /* CLOVISOR_HTTP1_H */
