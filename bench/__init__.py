"""Clovisor's end-to-end benchmark: overhead and capacity next to no tracing and tshark.

``python -m bench.run`` (``make bench``) builds a namespace node with an nginx
pod and a client pod, drives the same HTTP traffic three times per workload
(untraced, traced by ``clovisor trace``, captured by tshark) and reports
completeness, tracer CPU per request, peak RSS, latency against the untraced
baseline, events lost and in-kernel time per packet.  See ``bench/run.py``.
"""
