"""The synthetic web: a generated corpus of real images with captions and faults, served on loopback.

It is the demo's data source and the tests' (see corpus.py for what is generated
and server.py for how it is served).
"""

from pipeline.web.corpus import FAULT_BEHAVIOURS, SIZES, WebSpec, generate
from pipeline.web.server import SyntheticWeb, serve_forever, site_address

__all__ = ["FAULT_BEHAVIOURS", "SIZES", "WebSpec", "generate", "SyntheticWeb", "serve_forever", "site_address"]
