#!/usr/bin/env python3
"""rangeserve.py DIR [--no-range]: serve DIR's files on 127.0.0.1 (a free port, printed on
stdout's first line) with byte ranges (206, Content-Range), an ETag and If-Match, as a
plain web server or CDN serves images. python3 -m http.server ignores Range; --no-range
behaves like it (200 and the whole file), to test that diskconv refuses such a server."""
import hashlib
import http.server
import os
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _file(self):
        p = os.path.join(ROOT, self.path.lstrip("/").split("?")[0])
        if not os.path.isfile(p):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        st = os.stat(p)
        etag = '"%s"' % hashlib.md5(("%d-%d" % (st.st_mtime_ns, st.st_size)).encode()).hexdigest()
        return p, st.st_size, etag

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body):
        f = self._file()
        if f is None:
            return
        p, size, etag = f
        im = self.headers.get("If-Match")
        if im is not None and im != etag and im != "*":
            self.send_response(412)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, size
        rng = self.headers.get("Range")
        partial = False
        if rng and RANGES and rng.startswith("bytes="):
            a, b = rng[6:].split("-", 1)
            start = int(a)
            end = min(int(b) + 1 if b else size, size)
            partial = True
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % size)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end - 1, size))
        if RANGES:
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if body:
            with open(p, "rb") as fh:
                fh.seek(start)
                left = end - start
                while left:
                    chunk = fh.read(min(left, 1 << 20))
                    self.wfile.write(chunk)
                    left -= len(chunk)


ROOT = sys.argv[1]
RANGES = "--no-range" not in sys.argv
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(srv.server_address[1], flush=True)
srv.serve_forever()
