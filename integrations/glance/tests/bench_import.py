"""Stock `image_conversion` (qemu-img) against `diskconv_conversion` on one Glance: node A
runs the stock plugin, node B ours (GLANCE_PAIR_PLUGINS, set by
benches/glance-import-vs-stock.sh), one database, one file store, the same images.

Prints, per source format of the standard workload (benches/gen-workload.py, BENCH_SIZE
bytes), the median import wall time (import call to `active`) of each plugin over
BENCH_ROUNDS rounds, alternating which goes first, and the ratio ours / stock; then what
each plugin does with the hostile set. Not collected by the normal test run.
"""

import os
import statistics
import subprocess
import time

from conftest import REPO, WORK
from test_import import hostile_images

FORMATS = [
    ("qcow2", "qcow2", ["-O", "qcow2"]),
    ("qcow2 zlib", "qcow2", ["-c", "-O", "qcow2"]),
    ("vmdk streamOptimized", "vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    ("vmdk monolithicSparse", "vmdk", ["-O", "vmdk"]),
    ("vhd", "vhd", ["-O", "vpc"]),
    ("vhdx", "vhdx", ["-O", "vhdx"]),
    ("vdi", "vdi", ["-O", "vdi"]),
]


def import_seconds(cluster, node, disk_format, path):
    """(seconds, md5) of one import, or (None, the failure's message and log line)."""
    iid = cluster.create(node, "bench", disk_format)
    cluster.stage(node, iid, path)
    t0 = time.monotonic()
    r = cluster.import_(node, iid)
    assert r.status_code == 202, r.text
    while True:
        img = cluster.get(node, iid)
        if img["status"] == "active":
            break
        if img["status"] == "queued":
            why = cluster.failure_message(node, iid)
            with open(os.path.join(node.dir, "glance-api.log")) as f:
                errs = [ln.split("Stderr: ", 1)[1].strip() for ln in f
                        if "Stderr: " in ln and iid in ln]
            cluster.delete(node, iid)
            return None, "%s (%s)" % (why, errs[-1][:90] if errs else "no stderr")
        time.sleep(0.02)
    took = time.monotonic() - t0
    md5 = cluster.get(node, iid)["checksum"]
    cluster.delete(node, iid)
    return took, md5


def test_stock_against_ours(cluster):
    assert cluster.plugins == ["image_conversion", "diskconv_conversion"], cluster.plugins
    size = int(os.environ.get("BENCH_SIZE", 1 << 30))
    rounds = int(os.environ.get("BENCH_ROUNDS", 3))
    d = os.path.join(WORK, "bench")
    os.makedirs(d, exist_ok=True)
    raw = os.path.join(d, "workload.raw")
    subprocess.run(["python3", os.path.join(REPO, "benches", "gen-workload.py"), raw,
                    str(size)], check=True)
    stock, ours = cluster.node(0), cluster.node(1)
    rows = []
    for name, disk_format, opts in FORMATS:
        src = os.path.join(d, name.replace(" ", "-") + ".img")
        subprocess.run(["qemu-img", "convert", "-f", "raw"] + opts + [raw, src], check=True)
        times = {"stock": [], "ours": []}
        sums, failed = set(), {}
        for r in range(rounds):
            order = [("stock", stock), ("ours", ours)]
            if r % 2:
                order.reverse()
            for who, node in order:
                if who in failed:
                    continue
                took, md5 = import_seconds(cluster, node, disk_format, src)
                if took is None:
                    failed[who] = md5
                    continue
                times[who].append(took)
                sums.add(md5)
        # Both plugins stored the same bytes.
        assert len(sums) <= 1, (name, sums)
        assert "ours" not in failed, (name, failed)
        o = statistics.median(times["ours"])
        if "stock" in failed:
            rows.append((name, "fails: " + failed["stock"], "%.2f" % o, "-"))
        else:
            s = statistics.median(times["stock"])
            rows.append((name, "%.2f" % s, "%.2f" % o, "%.2fx" % (o / s)))
        os.remove(src)
    print("\nimport wall time, %d MiB standard workload, median of %d, %d cores"
          % (size >> 20, rounds, os.cpu_count()))
    print("| source | stock image_conversion (s) | diskconv_conversion (s) | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print("| %s | %s | %s | %s |" % row)

    print("\nhostile set (stock plugin = Glance's format_inspector, then qemu-img)")
    print("| image | stock image_conversion | diskconv_conversion |")
    print("|---|---|---|")
    for name, disk_format, path, _ in hostile_images():
        cells = []
        for node in (stock, ours):
            iid = cluster.create(node, "hostile-" + name, disk_format)
            try:
                cluster.stage(node, iid, path)
            except Exception as e:   # Glance 33 inspects uploads as they stage
                cells.append("refused at staging: %s" % str(e)[:80])
                continue
            cluster.import_(node, iid)
            img = cluster.wait(node, iid)
            if img["status"] == "active":
                cells.append("**imported** (%s, %d bytes)" % (img["disk_format"], img["size"]))
            else:
                cells.append("refused: %s" % cluster.failure_message(node, iid)[:100])
            cluster.delete(node, iid)
        print("| %s | %s | %s |" % (name, cells[0], cells[1]))
