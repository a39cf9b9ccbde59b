"""JSON over HTTP to a running webui: the one client of ``bench quality --engine webui*`` and
``bench speed --engine webui``. Errors become one ``TIError`` saying what to fix (start it with ``--api``,
pass ``--webui-auth``, fix ``--webui-url``)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

from ..errors import TIError


class WebuiClient:
    """A webui started with ``--api`` (and ``--api-auth`` when ``auth``, ``user:password``, is given)."""

    def __init__(self, url: str, auth: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if auth:
            if ":" not in auth:
                raise TIError(f"--webui-auth {auth!r} must be user:password (as in the webui's --api-auth)")
            self.headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode("ascii")

    def call(self, method: str, path: str, body: dict | None = None, *, timeout: float = 600) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            hint = " (start the webui with --api and, if it uses --api-auth, pass --webui-auth)" \
                if exc.code in (401, 404) else ""
            raise TIError(f"the webui at {self.url} answered {exc.code} to {method} {path}: {detail}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TIError(f"cannot reach the webui at {self.url} ({exc}); start it with --api, or fix --webui-url") \
                from None
