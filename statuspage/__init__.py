"""A live status page for the supervisor: a separate process, a client of its sockets.

``python -m statuspage`` (or ``supervisor-status-page``); see
``docs/status-page.md``.  Like ``herd``, it never imports the engine: it
speaks the control protocol on the read-only socket (and, only when the
operator turns writes on, on the read-write socket).
"""
