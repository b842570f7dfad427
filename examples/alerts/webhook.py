#!/usr/bin/env python3
"""A xenpool alert: POST each event as JSON to a webhook URL (a chat bridge, a pager).

    --alert="/path/to/webhook.py https://hooks.example.com/xenpool"

The event arrives as JSON on stdin; the daemon kills an alert that takes longer than
--alert-timeout, and a failing alert is only logged: it never holds up a failover.
"""

import sys
import urllib.request

url = sys.argv[1]
event = sys.stdin.buffer.read()
request = urllib.request.Request(
    url, data=event, headers={"content-type": "application/json"}
)
with urllib.request.urlopen(request, timeout=10) as response:
    sys.exit(0 if 200 <= response.status < 300 else 1)
