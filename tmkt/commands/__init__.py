"""CLI command groups; each module exposes `register(app)`."""

import logging

# spikingjelly registers its LIF op with torch.library.triton_op, and torch warns "Triton not
# available" on every CPU-only install: noise on stderr for the user, not a problem.
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
