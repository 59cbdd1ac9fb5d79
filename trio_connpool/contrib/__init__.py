"""Optional integrations of trio_connpool with other libraries.

Each integration is a module of its own that imports its library only there, so
``import trio_connpool`` never needs any of them: ``trio_connpool.contrib.httpx`` needs
``httpx`` (the ``httpx`` extra), ``trio_connpool.contrib.opentelemetry`` needs
``opentelemetry-api`` (the ``otel`` extra).
"""
