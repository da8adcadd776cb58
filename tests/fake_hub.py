"""A local stand-in for the Hub's HTTP API, enough for create_repo + upload_folder (regular files).

huggingface_hub's real client talks to it through HF_ENDPOINT, so the upload code path is exercised
up to the network boundary; the server records every request (path, Authorization, body).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    def _reply(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(
            {"method": "POST", "path": self.path, "authorization": self.headers.get("Authorization"), "body": body}
        )
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            return self._reply(200, {"url": f"{base}/{payload.get('organization')}/{payload['name']}"})
        if self.path == "/api/validate-yaml":  # the Hub checks a README's front matter before a commit
            import yaml

            content = json.loads(body)["content"]
            try:
                meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
            except yaml.YAMLError as err:
                return self._reply(400, {"error": f"invalid YAML: {err}"})
            if not isinstance(meta, dict) or not isinstance(meta.get("license"), str):
                return self._reply(400, {"error": "front matter needs a license"})
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            return self._reply(
                200, {"commitUrl": f"{base}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40, "pullRequestUrl": None}
            )
        return self._reply(404, {"error": "not found"})

    def do_GET(self):  # noqa: N802
        self.server.requests.append(
            {"method": "GET", "path": self.path, "authorization": self.headers.get("Authorization"), "body": b""}
        )
        self._reply(404, {"error": "not found"})

    def log_message(self, *args):  # keep test output clean
        pass


class FakeHub:
    def __enter__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.requests = []
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        return self

    @property
    def requests(self) -> list[dict]:
        return self.server.requests

    def committed_files(self) -> dict[str, int]:
        """path -> size in bytes of every file in the commits received."""
        import base64

        files = {}
        for req in self.requests:
            if "/commit/" in req["path"]:
                for line in req["body"].decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = len(base64.b64decode(item["value"]["content"]))
        return files

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
