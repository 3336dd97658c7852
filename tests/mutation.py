#!/usr/bin/env python3
"""Differential mutation test: diskconv against qemu-img on mutated and truncated images.

Makes a small guest disk, has qemu-img write it in every format and subformat both tools
read, then, case after case, mutates one image (bit flips, interesting values in
fields, block copies, truncation, growth; VHD checksums repaired in most cases so the
mutation reaches the tables behind them) and converts it to raw with both tools. Flags:

  (a) diskconv panicking, dying on a signal, running past the hang guard, or peaking
      over 64 MiB of memory                                   -> always a bug;
  (b) both tools succeeding with different guest bytes or sizes;
  (c) qemu-img refusing an image that diskconv converts.

Each (b) and (c) finding gets a class; the classes decided in tests/MUTATION.md (from
the format specs) are listed in KNOWN below. The run exits 1 on any (a) finding and on a
(b) or (c) finding of a class not in KNOWN, so CI catches regressions and new classes;
the summary lists every class with a reproducer (mutated files are kept in --keep).

usage: tests/mutation.py [--seconds N] [--cases N] [--seed S] [--keep DIR] [--bin PATH]
       tests/mutation.py --seed S --only CASE --keep DIR   (rebuild one case's files)

Needs qemu-img (apt-get install qemu-utils), GNU time (apt-get install time) and a
release build (cargo build --release). Same seed, same mutations (qemu-img's own
random UUIDs aside); one case takes ~50 ms.
"""
import argparse
import hashlib
import os
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
HANG_GUARD = 60  # seconds: far above any honest run on these small files
MEM_LIMIT_KIB = 64 * 1024

# name, qemu-img format, qemu-img convert args, file to mutate (relative), extra diskconv args
VARIANTS = [
    ("qcow2-v2", "qcow2", ["-o", "compat=0.10"], None, []),
    ("qcow2-v3", "qcow2", ["-o", "compat=1.1"], None, []),
    ("qcow2-512", "qcow2", ["-o", "cluster_size=512"], None, []),
    ("qcow2-zlib", "qcow2", ["-c"], None, []),
    ("qcow2-zstd", "qcow2", ["-c", "-o", "compression_type=zstd"], None, []),
    ("qcow2-l2ext", "qcow2", ["-o", "extended_l2=on,cluster_size=64k"], None, []),
    ("qcow2-rc1", "qcow2", ["-o", "refcount_bits=1"], None, []),
    ("qcow2-rc64", "qcow2", ["-o", "refcount_bits=64,cluster_size=4k"], None, []),
    ("vpc-dynamic", "vpc", ["-o", "subformat=dynamic"], None, []),
    ("vpc-fixed", "vpc", ["-o", "subformat=fixed"], None, []),
    ("vmdk-sparse", "vmdk", ["-o", "subformat=monolithicSparse"], None, []),
    ("vmdk-stream", "vmdk", ["-o", "subformat=streamOptimized"], None, []),
    ("vmdk-flat", "vmdk", ["-o", "subformat=monolithicFlat"], None, ["--allow-references"]),
    ("vmdk-2gbsparse", "vmdk", ["-o", "subformat=twoGbMaxExtentSparse"], "-s001", ["--allow-references"]),
    ("vdi-dynamic", "vdi", [], None, []),
    ("vdi-static", "vdi", ["-o", "static=on"], None, []),
]

INTERESTING32 = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0x1000, 0x10000, 0x7FFFFFFF,
                 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
INTERESTING64 = INTERESTING32 + [1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63,
                                 (1 << 64) - 1, (1 << 64) - 512]


def make_guest(path, seed):
    """A 4 MiB guest disk (plus one odd sector) mixing holes, random data, text and
    written zeros, deterministic in seed."""
    rng = random.Random(seed)
    size = 4 * MIB + 512
    with open(path, "wb") as f:
        f.truncate(size)
        off = 0
        while off < size:
            n = min(rng.choice([512, 4096, 65536, 200000]), size - off)
            k = rng.random()
            f.seek(off)
            if k < 0.35:
                pass  # hole
            elif k < 0.6:
                f.write(rng.randbytes(n))
            elif k < 0.85:
                f.write((b"the quick brown fox %d " % off) * (n // 24 + 1))
            else:
                f.write(bytes(n))
            off += n
        f.truncate(size)


def make_bases(work, seed):
    guest = os.path.join(work, "guest.raw")
    make_guest(guest, seed)
    bases = {}
    for name, fmt, args, target, _ in VARIANTS:
        d = os.path.join(work, "base-" + name)
        os.makedirs(d, exist_ok=True)
        img = os.path.join(d, "img." + fmt)
        r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt] + args + [guest, img],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"skip {name}: qemu-img cannot make it: {r.stderr.strip()}", file=sys.stderr)
            continue
        mut = img if target is None else os.path.join(d, "img" + target + "." + fmt)
        if not os.path.exists(mut):
            print(f"skip {name}: no {mut}", file=sys.stderr)
            continue
        bases[name] = (d, os.path.basename(img), os.path.basename(mut))
    return bases


def vhd_fix_checksums(b):
    """Recompute the VHD footer checksums (end copy and, for dynamic disks, the copy at
    0) and the dynamic header's, so a mutation behind them is reached."""
    def fix(off, length, field):
        if off < 0 or off + length > len(b):
            return
        blk = bytearray(b[off:off + length])
        blk[field:field + 4] = b"\0\0\0\0"
        s = (~sum(blk)) & 0xFFFFFFFF
        b[off + field:off + field + 4] = struct.pack(">I", s)

    if len(b) >= 512 and b[-512:-504] == b"conectix":
        fix(len(b) - 512, 512, 64)
    if b[:8] == b"conectix":
        fix(0, 512, 64)
        data_off = struct.unpack(">Q", b[16:24])[0]
        if data_off < len(b) - 1024 and b[data_off:data_off + 8] == b"cxsparse":
            fix(data_off, 1024, 36)


def vhd_bitmaps_filled(b):
    """The dynamic VHD with every allocated block's sector bitmap set to all ones (every
    sector present), or None when its headers cannot be followed."""
    b = bytearray(b)
    foot = b[-512:] if len(b) >= 512 and b[-512:-504] == b"conectix" else b[:512]
    if foot[:8] != b"conectix":
        return None
    data_off = struct.unpack(">Q", foot[16:24])[0]
    if data_off + 1024 > len(b) or b[data_off:data_off + 8] != b"cxsparse":
        return None
    table, = struct.unpack(">Q", b[data_off + 16:data_off + 24])
    entries, block = struct.unpack(">II", b[data_off + 28:data_off + 36])
    if block == 0 or block % 512 or entries > 1 << 20:
        return None
    bitmap = ((block // 512 + 7) // 8 + 511) // 512 * 512
    for i in range(entries):
        o = table + 4 * i
        if o + 4 > len(b):
            break
        sec, = struct.unpack(">I", b[o:o + 4])
        if sec != 0xFFFFFFFF and sec * 512 + bitmap <= len(b):
            b[sec * 512:sec * 512 + bitmap] = b"\xff" * bitmap
    return bytes(b)


def pick_offset(rng, n):
    """Bias towards metadata: the first 64 KiB, the last 4 KiB, else anywhere."""
    k = rng.random()
    if k < 0.55:
        return rng.randrange(min(n, 65536))
    if k < 0.75:
        return max(0, n - 1 - rng.randrange(min(n, 4096)))
    return rng.randrange(n)


def mutate(data, rng, fmt):
    """Apply 1-3 mutations; returns (bytes, description)."""
    b = bytearray(data)
    what = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not b:
            break
        k = rng.random()
        if k < 0.30:
            o = pick_offset(rng, len(b))
            bit = rng.randrange(8)
            b[o] ^= 1 << bit
            what.append(f"flip bit {bit} at {o:#x}")
        elif k < 0.60:
            width = rng.choice([4, 8])
            o = pick_offset(rng, len(b)) & ~(width - 1)
            if o + width > len(b):
                continue
            v = rng.choice(INTERESTING32 if width == 4 else INTERESTING64)
            endian = ">" if fmt == "vpc" or (fmt == "qcow2") else "<"
            if rng.random() < 0.2:
                endian = "<" if endian == ">" else ">"
            b[o:o + width] = struct.pack(endian + ("I" if width == 4 else "Q"), v)
            what.append(f"set u{width * 8}{'be' if endian == '>' else 'le'} at {o:#x} = {v:#x}")
        elif k < 0.70:
            o = pick_offset(rng, len(b))
            v = rng.choice([0, 0xFF, 0x7F, 0x80])
            n = rng.choice([1, 16, 512])
            b[o:o + n] = bytes([v]) * len(b[o:o + n])
            what.append(f"fill {n} bytes at {o:#x} with {v:#x}")
        elif k < 0.78:
            n = rng.choice([512, 4096])
            src = rng.randrange(max(1, len(b) - n))
            dst = pick_offset(rng, len(b))
            chunk = b[src:src + n]
            b[dst:dst + len(chunk)] = chunk
            what.append(f"copy {n} bytes from {src:#x} to {dst:#x}")
        elif k < 0.93:
            r = rng.random()
            if r < 0.4:
                n = rng.randrange(len(b))
            elif r < 0.7:
                n = max(0, len(b) - 512 * rng.randrange(1, 9))
            else:
                n = rng.randrange(min(len(b), 65536))
            del b[n:]
            what.append(f"truncate to {n:#x}")
        else:
            n = rng.choice([1, 511, 512, 4096])
            b += bytes(rng.randrange(256) for _ in range(n)) if rng.random() < 0.5 else bytes(n)
            what.append(f"append {n} bytes")
    if fmt == "vpc" and rng.random() < 0.75:
        vhd_fix_checksums(b)
        what.append("VHD checksums repaired")
    return bytes(b), "; ".join(what) or "none"


def run_tool(cmd, limit_memory=False):
    """Run cmd under GNU time and the hang guard, with a 1 GiB address-space limit when
    limit_memory (diskconv: a runaway allocation dies instead of hurting the machine;
    qemu-img's threads need more); returns (exit code, negative for a signal, or
    'timeout'; stderr text; peak RSS KiB or None)."""
    def limits():
        if limit_memory:
            resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    fd, tpath = tempfile.mkstemp()
    os.close(fd)
    p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", tpath] + cmd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=limits, start_new_session=True)
    try:
        _, err = p.communicate(timeout=HANG_GUARD)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # time and the tool under it: their own session
        _, err = p.communicate()
        rc = "timeout"
    txt = open(tpath).read()
    os.unlink(tpath)
    words = txt.split()
    rss = int(words[-1]) if words and words[-1].isdigit() else None
    m = re.search(r"terminated by signal (\d+)", txt)
    if m and rc != "timeout":
        rc = -int(m.group(1))
    return rc, err.decode("utf-8", "replace"), rss


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            # Sparse outputs: fine at these sizes (guest sizes are capped below).
            c = f.read(MIB)
            if not c:
                break
            h.update(c)
    return h.hexdigest()


def same_guest(a, b):
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    if sa != sb:
        return False, f"sizes {sa} (diskconv) vs {sb} (qemu-img)"
    if sa <= 256 * MIB:
        if file_digest(a) == file_digest(b):
            return True, ""
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", a, b])
    if r.returncode == 0:
        return True, ""
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                       capture_output=True, text=True)
    return False, (r.stdout.strip() or r.stderr.strip())[:200]


def bitmap_explains(data, img, fmt, binary, dout, qout):
    """True when diskconv reads the mutant like qemu-img once every sector bitmap says
    'present': the difference is only that diskconv honours the bitmaps."""
    filled = vhd_bitmaps_filled(data)
    if filled is None:
        return False
    with open(img, "wb") as f:
        f.write(filled)
    os.unlink(dout)
    rc, _, _ = run_tool([binary, "convert", "-q", "-f", fmt, "-O", "raw", img, dout], True)
    ok = rc == 0 and same_guest(dout, qout)[0]
    with open(img, "wb") as f:
        f.write(data)
    return ok


def first_line(text):
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("Command exited with"):
            # Drop paths and numbers so messages group into classes.
            line = re.sub(r"'[^']*'", "'…'", line)
            line = re.sub(r"/\S+", "…", line)
            line = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", line)
            return line[:160]
    return ""


# Classes decided in tests/MUTATION.md: (kind, variant regex, qemu message regex,
# diskconv outcome regex) -> the MUTATION.md heading that decides it.
KNOWN = [
    ("b", r"^vpc-dynamic$", r"", r"^sector bitmap$",
     "VHD sector bitmaps: accepted, diskconv follows the spec"),
    ("c", r"^vmdk-(sparse|stream)$",
     r"Invalid argument|invalid VMDK image descriptor|Unsupported image type", r"",
     "VMDK sparse file with a damaged embedded descriptor: accepted"),
    ("c", r"^vmdk-flat$", r"Could not open .*: Invalid argument$", r"",
     "VMDK descriptor without parentCID: accepted"),
]


def classify(kind, variant, qemu_err, detail):
    for k, vre, qre, dre, heading in KNOWN:
        if k == kind and re.search(vre, variant) and re.search(qre, qemu_err) \
                and re.search(dre, detail):
            return heading
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--cases", type=int, default=0, help="stop after N cases (0: time only)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", type=int, default=None, help="run just this case number")
    ap.add_argument("--keep", default=None, help="folder for the files of flagged cases")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/diskconv"))
    ap.add_argument("--variants", default="", help="comma-separated subset of variant names")
    args = ap.parse_args()
    for tool in ["qemu-img", "/usr/bin/time"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install qemu-utils time")
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"{args.bin} missing: cargo build --release")

    work = tempfile.mkdtemp(prefix="diskconv-mutation-")
    # A private copy, so a rebuild during the run cannot pull the binary away.
    shutil.copy(args.bin, os.path.join(work, "diskconv"))
    args.bin = os.path.join(work, "diskconv")
    keep = args.keep
    if keep:
        os.makedirs(keep, exist_ok=True)
    try:
        bases = make_bases(work, args.seed)
        names = [v[0] for v in VARIANTS if v[0] in bases]
        if args.variants:
            names = [n for n in names if n in args.variants.split(",")]
        vinfo = {v[0]: v for v in VARIANTS}
        base_bytes = {n: open(os.path.join(bases[n][0], bases[n][2]), "rb").read() for n in names}
        start = time.monotonic()
        stats = {"cases": 0, "both_ok": 0, "both_fail": 0, "dc_only_fail": 0}
        classes = {}  # (kind, variant, qemu msg, detail) -> [count, first case, description]
        bugs = []
        case = 0 if args.only is None else args.only
        while True:
            if args.only is None:
                if time.monotonic() - start > args.seconds:
                    break
                if args.cases and case >= args.cases:
                    break
            rng = random.Random(f"{args.seed}:{case}")
            variant = names[case % len(names)]
            _, fmt, _, _, dc_extra = vinfo[variant]
            bdir, img_name, mut_name = bases[variant]
            cdir = os.path.join(work, "case")
            shutil.rmtree(cdir, ignore_errors=True)
            shutil.copytree(bdir, cdir)
            data, desc = mutate(base_bytes[variant], rng, fmt)
            with open(os.path.join(cdir, mut_name), "wb") as f:
                f.write(data)
            img = os.path.join(cdir, img_name)
            qout, dout = os.path.join(work, "q.raw"), os.path.join(work, "d.raw")
            for p in (qout, dout):
                if os.path.exists(p):
                    os.unlink(p)
            qrc, qerr, _ = run_tool(["qemu-img", "convert", "-f", fmt, "-O", "raw", img, qout])
            drc, derr, drss = run_tool([args.bin, "convert", "-q", "-f", fmt, "-O", "raw"]
                                       + dc_extra + [img, dout], limit_memory=True)
            stats["cases"] += 1
            if drss is not None:
                stats["peak_kib"] = max(stats.get("peak_kib", 0), drss)
            finding = None
            if drc == "timeout":
                finding = ("a", "hang", f"no exit after {HANG_GUARD} s")
            elif not isinstance(drc, int) or drc < 0 or drc > 2 or "panicked" in derr:
                finding = ("a", "crash", f"exit {drc}: {derr.strip()[:300]}")
            elif drss is not None and drss > MEM_LIMIT_KIB:
                finding = ("a", "memory", f"peak RSS {drss} KiB")
            elif drc == 0 and qrc == 0:
                stats["both_ok"] += 1
                same, why = same_guest(dout, qout)
                if not same:
                    finding = ("b", "differ", why)
                    if variant == "vpc-dynamic" and bitmap_explains(data, img, fmt, args.bin,
                                                                     dout, qout):
                        finding = ("b", "differ", "sector bitmap")
            elif drc == 0:
                finding = ("c", "qemu refuses", "")
            elif qrc == 0:
                stats["dc_only_fail"] += 1
                key = ("d", variant, "", first_line(derr))
                c = classes.setdefault(key, [0, case, desc])
                c[0] += 1
            else:
                stats["both_fail"] += 1
            if finding:
                kind, what, detail = finding
                if kind == "b":
                    detail_key = ("sector bitmap" if detail == "sector bitmap" else
                                  "size differs" if detail.startswith("sizes") else
                                  "content differs")
                else:
                    detail_key = what
                key = (kind, variant, first_line(qerr) if kind != "b" else "", detail_key)
                c = classes.setdefault(key, [0, case, desc, detail])
                c[0] += 1
                if kind == "a":
                    bugs.append((case, variant, desc, detail))
                if keep and c[0] <= 2:
                    dst = os.path.join(keep, f"case{case}-{variant}")
                    shutil.rmtree(dst, ignore_errors=True)
                    shutil.copytree(cdir, dst)
            if args.only is not None:
                print(f"case {case} {variant}: {desc}: qemu-img {qrc} {first_line(qerr)}; "
                      f"diskconv {drc} {first_line(derr)} (peak {drss} KiB)")
                break
            case += 1

        print(f"mutation test: seed {args.seed}, {stats['cases']} cases over {len(names)} "
              f"variants in {time.monotonic() - start:.0f} s; both converted {stats['both_ok']}, "
              f"both refused {stats['both_fail']}, only diskconv refused {stats['dc_only_fail']}; "
              f"diskconv's largest peak RSS {stats.get('peak_kib', 0)} KiB")
        for key in sorted(classes, key=lambda k: (k[0], k[1], -classes[k][0])):
            kind, variant, qmsg, detail = key
            count, first, desc = classes[key][:3]
            if kind == "d":
                continue
            heading = classify(kind, variant, qmsg, detail)
            tag = f"known: {heading}" if heading else "NEW"
            print(f"  ({kind}) {variant}: {detail}; qemu-img: {qmsg or '-'} x{count} [{tag}]\n"
                  f"      reproduce: tests/mutation.py --seed {args.seed} --only {first} "
                  f"--keep DIR   ({desc})")
        dcount = sum(v[0] for k, v in classes.items() if k[0] == "d")
        if dcount:
            print(f"  diskconv refused {dcount} images qemu-img converted (parity notes, not "
                  f"flagged); top messages:")
            top = sorted(((v[0], k[1], k[3], v[1]) for k, v in classes.items() if k[0] == "d"),
                         reverse=True)[:12]
            for n, variant, msg, first in top:
                print(f"      {variant}: {msg} x{n} (case {first})")
        for case, variant, desc, detail in bugs[:20]:
            print(f"BUG case {case} {variant}: {desc}: {detail}")
        failed = sum(v[0] for k, v in classes.items()
                     if k[0] == "a" or (k[0] in "bc" and not classify(k[0], k[1], k[2], k[3])))
        print(f"{stats['cases'] - failed} passed, {failed} failed")
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
