"""The plugin in a real two-node Glance (conftest.py): imports through either node, in
every source format, into every store, hostile images refused, a node killed mid-import.
"""

import concurrent.futures
import hashlib
import os
import shutil
import signal
import subprocess
import time

import pytest
import requests

from conftest import WORK, need, sha256_file
from diskconv_glance import recover as recover_mod

# (name, Glance disk_format, container_format, how qemu-img or diskconv makes it)
SOURCES = [
    ("qcow2", "qcow2", "bare", ["qemu-img", "convert", "-O", "qcow2"]),
    ("qcow2-zlib", "qcow2", "bare", ["qemu-img", "convert", "-c", "-O", "qcow2"]),
    ("vmdk-stream", "vmdk", "bare",
     ["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized"]),
    ("vmdk-sparse", "vmdk", "bare", ["qemu-img", "convert", "-O", "vmdk"]),
    ("vhd", "vhd", "bare", ["qemu-img", "convert", "-O", "vpc"]),
    ("vhdx", "vhdx", "bare", ["qemu-img", "convert", "-O", "vhdx"]),
    ("vdi", "vdi", "bare", ["qemu-img", "convert", "-O", "vdi"]),
    ("ova", "vmdk", "ova", ["DISKCONV", "convert", "-O", "ova"]),
]


@pytest.fixture(scope="session")
def sources(cluster):
    """One 48 MiB guest disk with data in several places, in every source format; and
    the sha256 of `diskconv convert -O raw` of each (what the store must hold)."""
    d = os.path.join(WORK, "sources")
    os.makedirs(d, exist_ok=True)
    raw = os.path.join(d, "guest.raw")
    with open(raw, "wb") as f:
        f.truncate(48 << 20)
        for i, off in enumerate((0, 3 << 20, 20 << 20, (48 << 20) - 700_000)):
            f.seek(off)
            f.write(hashlib.sha512(b"%d" % i).digest() * (600_000 // 64))
    out = {}
    for name, _, _, cmd in SOURCES:
        path = os.path.join(d, name + "." + ("ova" if name == "ova" else "img"))
        cmd = [cluster.binary if c == "DISKCONV" else c for c in cmd]
        subprocess.run(cmd + ["-f", "raw", raw, path], check=True)
        out[name] = path
    want = {}
    for name, path in out.items():
        conv = path + ".raw"
        subprocess.run([cluster.binary, "convert", "-O", "raw", path, conv], check=True)
        want[name] = (sha256_file(conv), os.path.getsize(conv))
        os.remove(conv)
    return out, want


def downloaded_sha256(cluster, node, image_id):
    h = hashlib.sha256()
    r = requests.get("%s/v2/images/%s/file" % (node.url, image_id),
                     headers=cluster.HEADERS, stream=True)
    r.raise_for_status()
    for chunk in r.iter_content(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def assert_imported(cluster, node, img, want):
    """The image is active and its store holds exactly `diskconv convert -O raw` of the
    source (want: that output's sha256 and size)."""
    want_sha256, want_size = want
    assert img["status"] == "active", img
    assert img["disk_format"] == "raw" and img["container_format"] == "bare"
    assert img["virtual_size"] == want_size and img["size"] == want_size
    # Glance's own digests, computed while it stored the data, are diskconv's.
    assert img["checksum"] == img["diskconv_md5"]
    assert img["os_hash_algo"] == "sha512"
    assert img["os_hash_value"] == img["diskconv_sha512"]
    assert downloaded_sha256(cluster, node, img["id"]) == want_sha256


def staging_files(cluster):
    return {n.name: sorted(os.listdir(n.staging)) for n in cluster.nodes
            if os.path.isdir(n.staging)}


def no_staging_left(cluster):
    return all(not v for v in staging_files(cluster).values())


def plugin_ran_on(node, image_id):
    with open(os.path.join(node.dir, "glance-api.log")) as f:
        return any("diskconv_conversion: image %s" % image_id in line for line in f)


def test_staged_on_a_imported_through_b_runs_on_a(cluster, sources):
    paths, want = sources
    a, b = cluster.node(0), cluster.node(1)
    iid = cluster.create(a, "a-to-b", "qcow2")
    cluster.stage(a, iid, paths["qcow2"])
    r = cluster.import_(b, iid)
    assert r.status_code == 202, r.text
    img = cluster.wait(b, iid)
    assert_imported(cluster, b, img, want["qcow2"])
    assert plugin_ran_on(a, iid) and not plugin_ran_on(b, iid)
    assert img["diskconv_import_node"] == a.url
    assert no_staging_left(cluster), staging_files(cluster)


def test_eight_formats_at_once_over_both_nodes(cluster, sources):
    paths, want = sources

    def one(i, src):
        name, disk_format, container, _ = src
        stage_node, import_node = cluster.node(i % 2), cluster.node((i // 2) % 2)
        iid = cluster.create(stage_node, "conc-" + name, disk_format, container)
        cluster.stage(stage_node, iid, paths[name])
        r = cluster.import_(import_node, iid)
        assert r.status_code == 202, (name, r.text)
        return name, import_node, cluster.wait(import_node, iid)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda a: one(*a), enumerate(SOURCES)))
    assert len(done) == 8
    for name, node, img in done:
        assert_imported(cluster, node, img, want[name])
    assert no_staging_left(cluster), staging_files(cluster)


def test_web_download_is_converted_too(cluster, sources, web):
    paths, want = sources
    root, url = web
    shutil.copy(paths["vdi"], os.path.join(root, "disk.vdi"))
    node = cluster.node(1)
    iid = cluster.create(node, "web", "vdi")
    r = cluster.import_(node, iid, method="web-download", uri=url + "/disk.vdi")
    assert r.status_code == 202, r.text
    assert_imported(cluster, node, cluster.wait(node, iid), want["vdi"])
    assert no_staging_left(cluster), staging_files(cluster)


@pytest.mark.parametrize("store", ["fs", "s3", "rbd"])
def test_each_store_holds_the_raw_image(cluster, sources, store):
    need(store in cluster.stores, "the %s store's server (scripts/test starts it)" % store)
    paths, want = sources
    node = cluster.node(0)
    iid = cluster.create(node, "store-" + store, "vhdx")
    cluster.stage(node, iid, paths["vhdx"])
    r = cluster.import_(node, iid, stores=[store])
    assert r.status_code == 202, r.text
    img = cluster.wait(node, iid)
    assert img["stores"] == store
    assert_imported(cluster, node, img, want["vhdx"])


OS_RELEASE = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
"""


def test_guest_system_is_recorded_unless_the_user_said(cluster):
    need(shutil.which("mkfs.ext4"), "mkfs.ext4 (apt-get install e2fsprogs)")
    d = os.path.join(WORK, "guest-os")
    shutil.rmtree(d, ignore_errors=True)
    for sub in ("root/etc", "root/bin"):
        os.makedirs(os.path.join(d, sub))
    with open(os.path.join(d, "root/etc/os-release"), "w") as f:
        f.write(OS_RELEASE)
    with open(os.path.join(d, "root/etc/hostname"), "w") as f:
        f.write("web1\n")
    shutil.copy("/bin/true", os.path.join(d, "root/bin/true"))
    raw = os.path.join(d, "disk.raw")
    subprocess.run(["mkfs.ext4", "-q", "-d", os.path.join(d, "root"), raw, "64M"], check=True)
    img = os.path.join(d, "disk.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img], check=True)
    node = cluster.node(0)
    found = {}
    for case, props in (("found", {}), ("given", {"os_distro": "mine"})):
        iid = cluster.create(node, "guest-" + case, "qcow2", **props)
        cluster.stage(node, iid, img)
        assert cluster.import_(node, iid).status_code == 202
        found[case] = cluster.wait(node, iid)
        assert found[case]["status"] == "active", found[case]
    got = found["found"]
    assert (got["os_type"], got["os_distro"], got["os_version"], got["architecture"],
            got["hw_firmware_type"]) == ("linux", "debian", "12", "x86_64", "bios"), got
    # The user's own value stays; the rest is filled in.
    assert found["given"]["os_distro"] == "mine"
    assert found["given"]["os_version"] == "12"


def hostile_images():
    """(name, disk_format, path, what the failure message must say)."""
    d = os.path.join(WORK, "hostile")
    os.makedirs(d, exist_ok=True)
    q = lambda *a: subprocess.run(["qemu-img"] + list(a), check=True,
                                  stdout=subprocess.DEVNULL)
    guest = os.path.join(d, "guest.raw")
    with open(guest, "wb") as f:
        f.write(hashlib.sha512(b"guest").digest() * (1 << 14))
    q("convert", "-f", "raw", "-O", "qcow2", guest, os.path.join(d, "guest.qcow2"))
    out = []
    p = os.path.join(d, "backing.qcow2")
    q("create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", p, "1M")
    out.append(("backing-file", "qcow2", p, "NamesOtherFiles"))
    p = os.path.join(d, "datafile.qcow2")
    q("create", "-f", "qcow2", "-o", "data_file=" + os.path.join(d, "data.bin"), p, "1M")
    out.append(("data-file", "qcow2", p, "ExternalDataFile"))
    p = os.path.join(d, "extent.vmdk")
    with open(p, "w") as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                'createType="monolithicFlat"\nRW 2048 FLAT "/etc/shadow" 0\n')
    out.append(("vmdk-host-extent", "vmdk", p, "NamesOtherFiles"))
    p = os.path.join(d, "qcow2-in-raw.img")
    shutil.copy(os.path.join(d, "guest.qcow2"), p)
    out.append(("qcow2-claimed-raw", "raw", p, "claimed raw but the data is qcow2"))
    p = os.path.join(d, "luks.qcow2")
    q("create", "-f", "qcow2", "--object", "secret,id=s0,data=x", "-o",
      "encrypt.format=luks,encrypt.key-secret=s0", p, "1M")
    out.append(("luks", "qcow2", p, "Encrypted"))
    p = os.path.join(d, "huge.qcow2")
    q("create", "-f", "qcow2", p, "1P")
    out.append(("1-PiB", "qcow2", p, "ExceedsLimit"))
    p = os.path.join(d, "features.qcow2")
    shutil.copy(os.path.join(d, "guest.qcow2"), p)
    with open(p, "r+b") as f:   # incompatible_features (offset 72): an unknown bit
        f.seek(72)
        f.write((1 << 40).to_bytes(8, "big"))
    out.append(("unknown-features", "qcow2", p, "UnknownFeatures"))
    p = os.path.join(d, "footer-in-raw.img")
    shutil.copy(guest, p)
    q("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", guest, p + ".vhd")
    with open(p, "ab") as f:   # a raw guest whose last sector is a VHD footer
        f.write(open(p + ".vhd", "rb").read()[-512:])
    out.append(("vhd-footer-in-raw", "raw", p, "Polyglot"))
    return out


def test_hostile_images_fail_the_import_cleanly(cluster, sources):
    node = cluster.node(0)
    failures = {}
    for name, disk_format, path, says in hostile_images():
        iid = cluster.create(node, "hostile-" + name, disk_format)
        cluster.stage(node, iid, path)
        assert cluster.import_(node, iid).status_code == 202
        img = cluster.wait(node, iid)
        assert img["status"] == "queued", (name, img["status"])
        assert img["os_glance_failed_import"] == "fs", name
        assert not img.get("checksum") and not img.get("os_hash_value"), name
        msg = cluster.failure_message(node, iid)
        failures[name] = msg
        assert says in msg, (name, msg)
        assert not os.path.exists(os.path.join(cluster.store_dir, iid)), name
    assert no_staging_left(cluster), staging_files(cluster)
    print("\n".join("%s: %s" % kv for kv in failures.items()))


def wait_for_diskconv(image_id, timeout=120):
    """The pid of the diskconv converting this image, once it runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["pgrep", "-f", "diskconv convert .*%s" % image_id],
                             stdout=subprocess.PIPE, text=True).stdout.split()
        if out:
            return int(out[0])
        time.sleep(0.01)
    raise AssertionError("no diskconv convert for %s after %d s" % (image_id, timeout))


def run_recover(cluster, node_conf, *args):
    py = os.path.join(os.environ.get("GLANCE_VENV", os.path.join(
        os.path.dirname(WORK), "glance-venv")), "bin", "python")
    return subprocess.run([py, "-m", "diskconv_glance.recover", "--config-file",
                           node_conf] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_killed_node_fails_its_import_and_another_node_redoes_it(cluster, sources):
    paths, want = sources
    a, b = cluster.node(0), cluster.node(1)
    big = os.path.join(WORK, "sources", "big.qcow2")
    if not os.path.exists(big):
        # 1 GiB of zlib clusters: diskconv runs long enough to be found and stopped.
        raw = big + ".raw"
        with open(raw, "wb") as f:
            for i in range(256):
                f.write(hashlib.sha512(b"%d" % i).digest() * (4 << 14))
        subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, big],
                       check=True)
        os.remove(raw)
    iid = cluster.create(a, "killed", "qcow2")
    cluster.stage(a, iid, big)
    assert cluster.import_(a, iid).status_code == 202
    dc = wait_for_diskconv(iid)
    if os.environ.get("GLANCE_PLUGIN_BINARY") == "diskconv":
        # `binary = diskconv`: the one `pip install diskconv` put in Glance's venv.
        venv = os.environ["GLANCE_VENV"]
        assert os.readlink("/proc/%d/exe" % dc) == os.path.join(venv, "bin", "diskconv")
    # Frozen first, so that the node dies while the conversion is under way, always.
    os.kill(dc, signal.SIGSTOP)
    a.kill()
    # setpriv --pdeathsig: the conversion dies with the node.
    for _ in range(100):
        if not os.path.exists("/proc/%d" % dc):
            break
        time.sleep(0.05)
    assert not os.path.exists("/proc/%d" % dc), "diskconv outlived its glance-api"
    assert cluster.get(b, iid)["status"] == "importing"

    # From node B: A does not answer, so its imports are ended.
    r = run_recover(cluster, b.conf(), "--node", a.url)
    assert r.returncode == 0, r.stdout
    assert "ended the import of image %s" % iid in r.stdout
    img = cluster.get(b, iid)
    assert img["status"] == "queued" and img["os_glance_failed_import"] == "fs", img
    assert not img.get("checksum") and not os.path.exists(os.path.join(cluster.store_dir, iid))
    assert a.url in cluster.failure_message(b, iid)

    # Staged again and imported through B.
    cluster.stage(b, iid, paths["qcow2"])
    assert cluster.import_(b, iid).status_code == 202
    assert_imported(cluster, b, cluster.wait(b, iid), want["qcow2"])

    # A comes back: its recovery, run before it starts, empties its staging area.
    assert os.listdir(a.staging), "the kill left A's staged data (what this test is for)"
    r = run_recover(cluster, a.conf())
    assert r.returncode == 0, r.stdout
    assert os.listdir(a.staging) == [], r.stdout
    a.start()
    assert no_staging_left(cluster), staging_files(cluster)
    # A serves again.
    iid2 = cluster.create(a, "after-restart", "vdi")
    cluster.stage(a, iid2, paths["vdi"])
    assert cluster.import_(a, iid2).status_code == 202
    assert_imported(cluster, a, cluster.wait(a, iid2), want["vdi"])


def test_recover_refuses_a_live_node(cluster):
    r = run_recover(cluster, cluster.node(1).conf(), "--node", cluster.node(0).url)
    assert r.returncode == 1 and "answers" in r.stdout
