"""``python -m client.resident``: the resident trainer process (:func:`client.resident.server.main`)."""

import sys

from client.resident.server import main

sys.exit(main())
