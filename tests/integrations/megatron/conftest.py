"""The Megatron CPU suites run under the strict device proxy by default (set ``OPENRLHF_SEARCH_STRICT_DEVICES=0``
to run them with the plain CPU shim). The rank processes inherit the switch from this environment."""

import os

os.environ.setdefault("OPENRLHF_SEARCH_STRICT_DEVICES", "1")
