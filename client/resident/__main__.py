"""``python -m finlora.client.resident``: the resident trainer process (:func:`finlora.client.resident.server.main`)."""

import sys

from finlora.client.resident.server import main

sys.exit(main())
