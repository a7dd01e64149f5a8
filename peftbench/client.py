"""A small client for ``peftbench serve`` (standard library only)::

    from peftbench.client import Client

    client = Client("http://127.0.0.1:8000", token)
    client.classify("tnews", ["球队在决赛中以三比一获胜"], top_k=3)
    # [{"label": "103", "label_name": "体育", "score": 0.91, "top_k": [...]}]
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request


class ServerError(RuntimeError):
    """An answer other than 200: ``status`` and the server's ``detail``."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would send the token elsewhere (and turn a POST into a GET): answer it as an error instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Client:
    """Calls to one server; an answer other than 200 raises :class:`ServerError`; a server that cannot be reached
    or does not answer in ``timeout`` seconds raises ``OSError`` (``URLError``, ``TimeoutError``)."""

    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self._opener = urllib.request.build_opener(_NoRedirects)

    def classify(self, adapter: str, texts: list[str], text_pairs: list[str] | None = None,
                 top_k: int | None = 0) -> list[dict]:
        """One prediction per text: ``label``, ``label_name``, ``score`` (classification; with ``top_k``, also
        the k most probable labels, sorted, ``None``: all) or ``text`` and ``entities`` with character offsets
        (token classification)."""
        body = {"adapter": adapter, "texts": texts}
        if text_pairs is not None:
            body["text_pairs"] = text_pairs
        if top_k != 0:
            body["top_k"] = top_k
        route = {"X-Peftbench-Adapter": urllib.parse.quote(adapter, safe="")}  # for a proxy: one adapter, one worker
        return self._call("POST", "/v1/classify", body, route)["predictions"]

    def adapters(self) -> list[dict]:
        """What the server serves: each adapter's name, task, method, labels, base, and whether it is loaded."""
        return self._call("GET", "/v1/adapters")["adapters"]

    def add_adapter(self, name: str, path: str | None = None) -> dict:
        """Serve the checkpoint at ``path`` (default: the server's adapters folder's ``name``) as ``name``, loaded
        now; needs a client made with the admin token. Returns its description."""
        return self._call("POST", "/v1/admin/adapters", {"name": name, "path": path})["adapter"]

    def remove_adapter(self, name: str) -> int:
        """Stop serving ``name`` (admin token); returns how many requests queued for it are still answered."""
        return self._call("DELETE", f"/v1/admin/adapters/{urllib.parse.quote(name, safe='')}")[
            "requests_answered_first"]

    def healthy(self) -> bool:
        try:
            return self._call("GET", "/healthz").get("status") == "ok"
        except (OSError, ServerError):
            return False

    def _call(self, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json", **(headers or {})})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                body = response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    detail = json.loads(exc.read().decode("utf-8")).get("detail", "")
                except (ValueError, AttributeError, OSError):
                    detail = exc.reason
            raise ServerError(exc.code, str(detail)) from None
        try:
            answer = json.loads(body)
        except ValueError:
            raise ServerError(200, f"not a JSON answer: {body[:200]!r}") from None
        if not isinstance(answer, dict):
            raise ServerError(200, f"not a JSON object: {body[:200]!r}")
        return answer
