"""A two-node Glance for the plugin's tests: two glance-api processes (uWSGI, as
tests/servers/glance/start-glance.sh runs one) on their own ports, one PostgreSQL, one
file store directory both see (as an NFS mount would be), an S3 store on the SeaweedFS
and an RBD store on the Ceph that scripts/test starts, and a staging directory and a
worker_self_reference_url each. Started once per session, stopped by process id.

Env: DISKCONV_BIN (the binary under test), GLANCE_VENV, DISKCONV_TEST_S3_* and
DISKCONV_TEST_CEPH_* (stores; absent: those tests are skipped, or fail under CI).
"""

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
import requests

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SERVERS = os.path.join(REPO, "tests", "servers")
WORK = os.path.join(REPO, "target", "test-servers", "glance-pair")
IN_CI = bool(os.environ.get("CI"))


def need(cond, why):
    """Skip a test whose server is missing; under CI, fail it."""
    if not cond:
        if IN_CI:
            pytest.fail("needed under CI: " + why)
        pytest.skip(why)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def diskconv_bin():
    b = os.environ.get("DISKCONV_BIN") or os.path.join(REPO, "target", "release", "diskconv")
    if not os.path.isabs(b):
        b = shutil.which(b) or b
    assert os.access(b, os.X_OK), "no diskconv binary at %s (cargo build --release)" % b
    return b


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Node:
    """One glance-api process of the pair."""

    def __init__(self, name, port, env):
        self.name, self.port = name, port
        self.url = "http://127.0.0.1:%d" % port
        self.dir = os.path.join(WORK, name)
        self.env = env

    @property
    def staging(self):
        return os.path.join(self.dir, "staging")

    def start(self):
        env = dict(os.environ, GLANCE_VENV=self.env["venv"], GLANCE_PORT=str(self.port))
        subprocess.run([os.path.join(SERVERS, "glance", "start-glance.sh"), self.dir],
                       env=env, check=True, stdout=subprocess.DEVNULL)

    def stop(self):
        if os.path.exists(os.path.join(self.dir, "glance.env")):
            subprocess.run([os.path.join(SERVERS, "glance", "stop-glance.sh"), self.dir],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self):
        """SIGKILL the node's whole uWSGI group, as a crash or an OOM kill would."""
        env = dict(l.split("=", 1) for l in open(os.path.join(self.dir, "glance.env"))
                   .read().split("\n") if "=" in l)
        os.killpg(int(env["GLANCE_PID"]), 9)

    def conf(self):
        return os.path.join(self.dir, "etc", "glance-api.conf")

    def write_extra_conf(self, text):
        os.makedirs(os.path.join(self.dir, "etc"), exist_ok=True)
        with open(os.path.join(self.dir, "etc", "glance-api.extra.conf"), "w") as f:
            f.write(text)


class Cluster:
    """The pair, its database and stores; a small client for the image API."""

    HEADERS = {"X-Auth-Token": "saio"}

    def __init__(self):
        self.nodes = []
        self.stores = ["fs"]
        self.store_dir = os.path.join(WORK, "images")

    def node(self, i):
        return self.nodes[i]

    # -- the image API -------------------------------------------------------------
    def create(self, node, name, disk_format, container_format="bare", **props):
        r = requests.post(node.url + "/v2/images", headers=self.HEADERS, json=dict(
            props, name=name, disk_format=disk_format,
            container_format=container_format))
        r.raise_for_status()
        return r.json()["id"]

    def stage(self, node, image_id, path):
        with open(path, "rb") as f:
            r = requests.put("%s/v2/images/%s/stage" % (node.url, image_id), data=f,
                             headers=dict(self.HEADERS,
                                          **{"Content-Type": "application/octet-stream"}))
        r.raise_for_status()

    def import_(self, node, image_id, method="glance-direct", uri=None, stores=None):
        body = {"method": {"name": method}}
        if uri:
            body["method"]["uri"] = uri
        if stores:
            body["stores"] = stores
        return requests.post("%s/v2/images/%s/import" % (node.url, image_id),
                             headers=self.HEADERS, json=body)

    def get(self, node, image_id):
        r = requests.get("%s/v2/images/%s" % (node.url, image_id), headers=self.HEADERS)
        r.raise_for_status()
        return r.json()

    def tasks(self, node, image_id):
        r = requests.get("%s/v2/images/%s/tasks" % (node.url, image_id),
                         headers=self.HEADERS)
        r.raise_for_status()
        return r.json()["tasks"]

    def failure_message(self, node, image_id, timeout=60):
        """The message of the image's failed import task (set just after the revert)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            failed = [t for t in self.tasks(node, image_id) if t["status"] == "failure"]
            if failed:
                return failed[0]["message"]
            time.sleep(0.2)
        raise AssertionError("no failed task for image %s" % image_id)

    def wait(self, node, image_id, timeout=600):
        """The image once its import ended: active, or back to queued after a failure."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            img = self.get(node, image_id)
            if img["status"] == "active":
                return img
            if img["status"] == "queued" and img.get("os_glance_failed_import"):
                return img
            time.sleep(0.2)
        raise AssertionError("image %s still %s after %d s" % (image_id, img["status"],
                                                              timeout))

    def delete(self, node, image_id):
        requests.delete("%s/v2/images/%s" % (node.url, image_id), headers=self.HEADERS)


def _store_conf(stores_ini):
    """The [DEFAULT] enabled_backends line and each store's section."""
    names = ", ".join("%s:%s" % (n, t) for n, t, _ in stores_ini) + ", http:http"
    text = "[DEFAULT]\nenabled_backends = %s\n" % names
    for name, _, body in stores_ini:
        text += "[%s]\n%s\n" % (name, body)
    return text


@pytest.fixture(scope="session")
def cluster():
    venv = os.environ.get("GLANCE_VENV", os.path.join(REPO, "target", "test-servers",
                                                      "glance-venv"))
    need(os.path.exists(os.path.join(venv, "bin", "uwsgi")), "Glance venv at " + venv)
    binary = diskconv_bin()
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    pg_dir = os.path.join(WORK, "pg")
    subprocess.run([os.path.join(SERVERS, "postgres", "start-postgres.sh"), pg_dir],
                   check=True, stdout=subprocess.DEVNULL)
    pg = dict(l.split("=", 1) for l in open(os.path.join(pg_dir, "pg.env")).read().split()
              if "=" in l)
    c = Cluster()
    stores = [("fs", "file", "filesystem_store_datadir = %s/" % c.store_dir)]
    s3 = os.environ.get("DISKCONV_TEST_S3_ENDPOINT")
    if s3:
        stores.append(("s3", "s3", "\n".join([
            "s3_store_host = %s" % s3,
            "s3_store_access_key = %s" % os.environ["DISKCONV_TEST_S3_ACCESS_KEY"],
            "s3_store_secret_key = %s" % os.environ["DISKCONV_TEST_S3_SECRET_KEY"],
            "s3_store_bucket = glance-pair", "s3_store_create_bucket_on_put = true",
            "s3_store_bucket_url_format = path"])))
        c.stores.append("s3")
    ceph = os.environ.get("DISKCONV_TEST_CEPH_CONF")
    if ceph:
        stores.append(("rbd", "rbd", "\n".join([
            "rbd_store_pool = %s" % os.environ["DISKCONV_TEST_CEPH_POOL"],
            "rbd_store_user = admin", "rbd_store_ceph_conf = %s" % ceph,
            "rbd_store_chunk_size = 4"])))
        c.stores.append("rbd")
    c.ports = [free_port(), free_port()]
    # GLANCE_PAIR_PLUGINS=image_conversion,diskconv_conversion: each node its own plugin
    # (the benchmark's stock-against-ours on one Glance, one store).
    plugins = os.environ.get("GLANCE_PAIR_PLUGINS",
                             "diskconv_conversion,diskconv_conversion").split(",")
    c.plugins = plugins
    for i, name in enumerate(("node-a", "node-b")):
        node = Node(name, c.ports[i], {"venv": venv})
        node.write_extra_conf(_store_conf(stores) + """
[DEFAULT]
enabled_import_methods = [glance-direct, web-download]
worker_self_reference_url = {url}
[database]
connection = {db}
[glance_store]
default_backend = fs
[keystone_authtoken]
# Read when a node proxies an import to another; the saio filter takes any token.
auth_url = http://127.0.0.1:1/v3
[wsgi]
# The stock plugin runs qemu-img under oslo's prlimit wrapper with this interpreter.
python_interpreter = {venv}/bin/python
[image_import_opts]
image_import_plugins = ['{plugin}']
[image_conversion]
output_format = raw
[diskconv_conversion]
binary = {binary}
output_format = raw
""".format(url=node.url, db=pg["PG_URL"], plugin=plugins[i],
           binary=os.environ.get("GLANCE_PLUGIN_BINARY", binary),
           venv=venv))
        c.nodes.append(node)
    try:
        for node in c.nodes:
            node.start()
        c.binary = binary
        yield c
    finally:
        for node in c.nodes:
            node.stop()
        subprocess.run([os.path.join(SERVERS, "postgres", "stop-postgres.sh"), pg_dir],
                       stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def web():
    """A web server on 127.0.0.1 for web-download, serving files put in its folder."""
    root = os.path.join(WORK, "web")
    os.makedirs(root, exist_ok=True)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=root, **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield root, "http://127.0.0.1:%d" % srv.server_address[1]
    srv.shutdown()
