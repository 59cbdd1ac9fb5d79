"""What `trio.SSLStream` keeps to itself: bytes it has received and not yet decrypted.

An HTTP/1.1 connection may be reused only when nothing unread is left anywhere, and over TLS
that includes the TLS layer. When a response and bytes after it (a second TLS record) reach
us in one read from the socket, `trio.SSLStream` decrypts the first record, returns it, and
keeps the second in its incoming `ssl.MemoryBIO`: the socket then looks quiet and the public
``SSLStream.pending()`` (decrypted bytes held by the `ssl.SSLObject`) says 0. Nothing public
shows those bytes, so this module reads two private attributes of `trio.SSLStream`, here and
nowhere else: ``_incoming`` (the `ssl.MemoryBIO` fed from the transport) and ``_ssl_object``
(the `ssl.SSLObject` that decrypts from it).

Checked against trio 0.35.0. ``test_tls_buffers_of_trio_ssl_stream`` in
``tests/test_http11_hostile.py`` fails if trio renames them or changes what they are. Should
that happen, `tls_buffers` returns None and the caller must treat the TLS layer as never known
to be empty (the safe side: a connection is then not reused, rather than reused blind).
"""

from __future__ import annotations

import ssl

import trio

__all__ = ["tls_buffers"]


def tls_buffers(
    stream: trio.SSLStream[trio.abc.Stream],
) -> tuple[ssl.MemoryBIO, ssl.SSLObject] | None:
    """The incoming `ssl.MemoryBIO` and the `ssl.SSLObject` of ``stream``, or None if this
    trio keeps them elsewhere.

    ``incoming.pending`` counts the received bytes not yet decrypted, ``ssl_object.pending()``
    the decrypted bytes not yet returned: both are 0 when the TLS layer holds nothing unread.
    """
    incoming = getattr(stream, "_incoming", None)
    ssl_object = getattr(stream, "_ssl_object", None)
    if isinstance(incoming, ssl.MemoryBIO) and isinstance(ssl_object, ssl.SSLObject):
        return incoming, ssl_object
    return None
