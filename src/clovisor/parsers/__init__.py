"""The agent's own protocol parser plugins.

A module here (``clovisor.parsers.<name>``) that exports ``PARSER``, a
factory ``(endpoints, limits, stats, out, *, synced) -> Connection``, can be
named in the Redis hash ``clovisor_proto_cfg`` as ``<name>`` or
``clovisor.parsers.<name>``. Only modules of this package (and entry points
of the group ``clovisor.parsers``) can be named: see
:mod:`clovisor.agent.plugins` for the interface and the rules.

This package stays free of imports so that naming one plugin never runs
another one's code.
"""
