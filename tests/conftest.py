"""Test-wide setup: the tests talk to servers on 127.0.0.1 and start their own proxies.

Clients read proxy settings from the environment by default (``trust_env=True``): a machine
with ``HTTP_PROXY`` set (a CI runner behind a corporate proxy, say) would send the tests'
local traffic there. The variables are removed once, before any test runs; the tests that
exercise them set their own.
"""

from __future__ import annotations

import os

for _name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.upper(), None)
